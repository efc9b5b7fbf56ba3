"""The Reg-DPO training loop. Everything per micro-batch lives in step.py; building lives in setup.py.

One step: this rank's pair ids from the sampler -> micro-batches with keyed noise (their pairs read ahead
during the previous step, data.prefetch) -> reference errors
(no graph) -> policy forward/backward through megatron-core's schedule -> finalize grads -> clip and
AdamW (skipped when the loss or gradient norm is not finite) -> metrics -> maybe a checkpoint.
SIGTERM/SIGINT are honoured at the next step boundary: save, then return 0.
"""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from megatron_regdpo.parallel.pipeline import forward_backward

from .batches import micro_batches
from .eval_hook import maybe as eval_videos_of
from .metrics import DGRAlarm, average_microbatches, peak_memory_gb, reduce_over_group, step_metrics
from .metrics import objective_metrics as objective_names
from .optimizer import lr_at, optimizer_step, set_lr
from .step import make_forward_step, reference_pass


class StopRequested:
    """Records SIGTERM/SIGINT; every rank agrees at a step boundary (a signal may reach only some)."""

    def __init__(self):
        self.flag = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.flag = True

    def agreed(self) -> bool:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        flag = torch.tensor([1.0 if self.flag else 0.0], device=device)  # NCCL reduces CUDA tensors only
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def evaluate(run) -> dict:
    """Preference accuracy on the held-out pairs (share with s < 0) and their mean DPO loss: a
    forward-only pass through the same schedule, every layout included."""
    cfg, per_micro = run.cfg, run.cfg.data.micro_batch_pairs
    dp_rank = dist.get_rank(run.pg.dp)
    ids = run.eval_ids[dp_rank::run.dp_size]
    # the step-0 key at every evaluation: the same noise each time (held-out ids never meet it in training),
    # and for the cached reference the key its cache holds
    noise_step, draw = run.reference.noise_key(0, 0)
    collected: list[dict] = []
    # every replica runs the same number of forwards: under FSDP2 each one gathers weights across the
    # replicas, so a replica with fewer held-out pairs scores one of them again and drops the result
    rounds = -(-len(run.eval_ids) // (run.dp_size * per_micro))
    with torch.no_grad():
        for r in range(rounds):
            chunk = ids[r * per_micro:(r + 1) * per_micro]
            keep = collected.append if chunk else (lambda _metrics: None)
            mbs = micro_batches(run.dataset, chunk or run.eval_ids[:1], per_micro, seed=cfg.run.seed,
                                step=noise_step, draw=draw, fm=run.flow_matching, device=run.device, dtype=run.dtype)
            reference_pass(run.reference, mbs, run.reference_batch)
            forward_backward(run.model_chunks, make_forward_step(run.settings, run.pg.cp, keep,
                                                               pair_forward=cfg.objective.pair_forward),
                             iter(mbs), num_microbatches=len(mbs), tokens=run.tokens, micro_batch_size=2 * per_micro,
                             pg_collection=run.pg, forward_only=True)
    for chunk in run.model_chunks:  # FSDP2 keeps a root's weights gathered after a forward (for its backward);
        module = getattr(chunk, "module", chunk)  # there is none here: shard them again
        if hasattr(module, "reshard"):
            module.reshard()
    if dist.get_rank(run.pg.pp) != dist.get_world_size(run.pg.pp) - 1:
        return {}  # not the last pipeline stage: the loss lives there (as does the metrics writer)
    keys = ("dpo/implicit_acc", "loss/dpo", "dpo/reward_margin")
    # a replica without held-out pairs still joins the average, with weight 0
    local = reduce_over_group({k: sum(m[k] for m in collected) / max(len(collected), 1) for k in keys},
                              run.pg.dp, num_pairs=len(ids))
    return {f"eval/{k.split('/')[-1]}": v for k, v in local.items()}


def train(run, log) -> int:
    """`run`: a setup.TrainingRun (model, optimizer, data, reference, checkpointer, config)."""
    cfg, stop = run.cfg, StopRequested()
    alarm = DGRAlarm.from_beta_eff(run.settings.beta_eff)
    step, skipped_in_row = run.start_step, 0
    per_micro = cfg.data.micro_batch_pairs
    videos = eval_videos_of(run)  # validation videos (eval.videos), None when off
    try:
        while step < cfg.schedule.train_steps:
            t0 = time.perf_counter()
            ids = run.next_pair_ids()
            # noise key: the step itself; a cached reference fixes it to (cache step, draw = epoch)
            noise_step, draw = run.reference.noise_key(step, run.sampler.epoch)
            mbs = micro_batches(run.dataset, ids, per_micro, seed=cfg.run.seed, step=noise_step, draw=draw,
                                fm=run.flow_matching, device=run.device, dtype=run.dtype)
            data_s = time.perf_counter() - t0   # its micro-batches: pairs (read ahead), noise, to the device
            if run.prefetch and step + 1 < cfg.schedule.train_steps:
                run.dataset.prefetch(run.peek_pair_ids())   # read while this step computes
            reference_pass(run.reference, mbs, run.reference_batch)

            set_lr(run.optimizer, lr := lr_at(step, cfg.optim, cfg.schedule), cfg.optim.weight_decay)
            for chunk in run.model_chunks:
                chunk.zero_grad_buffer()
            run.optimizer.zero_grad()
            objective_metrics: list[dict] = []
            losses = forward_backward(run.model_chunks, make_forward_step(run.settings, run.pg.cp, objective_metrics.append,
                                                        pair_forward=cfg.objective.pair_forward),
                                      iter(mbs), num_microbatches=len(mbs), tokens=run.tokens,
                                      micro_batch_size=2 * per_micro, pg_collection=run.pg)
            loss = run.mean_loss(losses)
            applied, grad_norm = optimizer_step(run.optimizer, loss, cfg.optim.clip_grad)
            skipped_in_row = 0 if applied else skipped_in_row + 1
            run.skipped_total += 0 if applied else 1
            step += 1
            objective = average_microbatches([objective_names(m) for m in objective_metrics],
                                             num_pairs=[per_micro] * len(objective_metrics)) if objective_metrics else {}
            objective = reduce_over_group(objective, run.pg.dp, num_pairs=len(ids)) if objective else {}
            step_s = time.perf_counter() - t0
            metrics = step_metrics({**objective, "loss/total": loss}, step=step, lr=lr, grad_norm=grad_norm,
                                   skipped_steps=run.skipped_total, pairs=len(ids) * run.dp_size,
                                   step_s=step_s, peak_gb=peak_memory_gb(run.device))
            # per device: policy forward+backward ("model") and everything run, reference and recompute included
            for kind in ("model", "hardware"):
                metrics[f"throughput/{kind}_tflops"] = run.step_flops[kind] / step_s / dist.get_world_size() / 1e12
            metrics["time/data_s"] = data_s
            if cfg.eval.interval and step % cfg.eval.interval == 0:
                metrics.update(evaluate(run))   # one record per step: eval/ joins the step's line
            if videos is not None and videos.due(step):
                metrics.update(videos(step))    # eval/videos (the files), eval/fm_err_*, eval/clip_*, time/
            log.log(metrics)
            if "dpo/dgr" in metrics and log.active:  # the metrics are reduced on every rank: one rank warns
                alarm.update(metrics["dpo/dgr"], step)
            if skipped_in_row >= cfg.optim.max_skipped_steps:
                raise FloatingPointError(f"{skipped_in_row} steps in a row had a non-finite loss or gradient norm "
                                         f"(last: loss {loss}, grad norm {grad_norm}); stopping at step {step}")
            stopping = stop.agreed()
            if stopping or run.checkpoint_due(step):
                log.message(f"saved checkpoint {run.save(step)}")
            if stopping:
                log.message(f"stop requested: saved step {step}, exiting")
                return 0
        if not run.checkpoint_due(step):
            log.message(f"saved checkpoint {run.save(step)}")
        return 0
    finally:
        stop.restore()
        run.dataset.close()   # a read ahead that no step will use

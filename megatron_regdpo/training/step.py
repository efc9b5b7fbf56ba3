"""The Reg-DPO micro-batch step as megatron-core's schedules want it: forward_step(data_iterator, model).

Legend: P pairs in the micro-batch, B = 2P samples stacked [winners; losers], S_cp this rank's tokens.

A micro-batch is a dict with x_t [B, C_in, F, H, W], timestep [B], text [B, T, E], image [B, I, E'] or
None, target [B, C, F, H, W] (the velocity eps - x0), and err_ref_w / err_ref_l [P] from the reference
(computed beforehand, without a graph). The loss is computed on the last pipeline stage from per-sample
errors that are reduced over context parallelism BEFORE the log-sigmoid, then returned as the mean over
this micro-batch's pairs: megatron-core's schedule divides by the number of micro-batches and scales
by the CP size, and DDP averages over DP x CP, which makes the step's loss the mean over all its pairs.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from megatron_regdpo.objectives.per_sample import per_sample_sq_err
from megatron_regdpo.objectives.reg_dpo import RegDPOSettings, reg_dpo_loss, reg_dpo_metrics
from megatron_regdpo.parallel.data_parallel import unwrap
from megatron_regdpo.parallel.pipeline import forward_backward


def make_forward_step(settings: RegDPOSettings, cp_group, on_metrics: Callable[[dict], None] | None = None,
                      sq_err_sum_fn=None, pair_forward: str = "joint"):
    """A forward_step_func for megatron_regdpo.parallel.pipeline.forward_backward. `pair_forward`
    (objective.pair_forward): "joint" runs winners and losers as one batch, "separate" as two forwards
    (winners, then losers) whose outputs are concatenated for the loss (pipeline stages: joint only)."""

    def forward_step(data_iterator, model_chunk):
        mb = next(data_iterator)
        model = unwrap(model_chunk)
        inputs = (mb["x_t"], mb["timestep"], mb["text"], mb.get("image"))
        if pair_forward == "joint":
            out_BSP = model_chunk(*inputs, return_tokens=True)
        else:
            halves = [tuple(None if t is None else t[half] for t in inputs)
                      for half in (slice(0, len(mb["x_t"]) // 2), slice(len(mb["x_t"]) // 2, None))]
            out_BSP = torch.cat([model_chunk(*h, return_tokens=True) for h in halves])

        def loss_func(out: torch.Tensor):
            target = model.cp_chunk(model.patchify(mb["target"]))
            err_B = per_sample_sq_err(out.float(), target.float(), group=cp_group, sq_err_sum_fn=sq_err_sum_fn)
            err_w, err_l = err_B.chunk(2)
            result = reg_dpo_loss(err_w, err_l, mb["err_ref_w"], mb["err_ref_l"], settings)
            loss = result.loss_sum / result.num_pairs
            metrics = reg_dpo_metrics(result)
            if on_metrics is not None:
                on_metrics(metrics)
            # the schedule scales the returned loss in place: report a copy
            return loss, {"loss": loss.detach().clone(), "num_pairs": result.num_pairs}

        return out_BSP, loss_func

    return forward_step


def reference_pass(reference, mbs: list[dict], batch_of: Callable[[dict], object]) -> None:
    """Fill err_ref_w / err_ref_l of every micro-batch (no graph), bracketed by the reference's
    begin_step/end_step (cpu_swap copies its weights in once for all of them).

    A pipeline stage of a model-based reference (reference.pipelined()) runs its layers in a forward-only
    pass through megatron-core's schedule; only the last stage ends with the errors (and only it reads them,
    in the policy pass's loss). Without pipeline parallelism each micro-batch is one call."""
    reference.begin_step()
    # (a reference without `pipelined`, e.g. a stand-in for the cache, is whole on every rank)
    if getattr(reference, "pipelined", lambda: False)():
        errors: list = []
        x_t = batch_of(mbs[0]).x_t
        tokens = math.prod(unwrap(reference.stage).token_grid(x_t.shape))
        with torch.no_grad(), reference.stage_context():
            forward_backward([reference.stage], reference.stage_forward_step(batch_of, errors), iter(mbs),
                             num_microbatches=len(mbs), tokens=tokens, micro_batch_size=x_t.shape[0],
                             pg_collection=None, forward_only=True)
        assert len(errors) in (0, len(mbs)), (len(errors), len(mbs))  # the last stage has one per micro-batch
        for mb, (err_w, err_l) in zip(mbs, errors):
            mb["err_ref_w"], mb["err_ref_l"] = err_w, err_l
    else:
        for mb in mbs:
            mb["err_ref_w"], mb["err_ref_l"] = reference(batch_of(mb))
    reference.end_step()

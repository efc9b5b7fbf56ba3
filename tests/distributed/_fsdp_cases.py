"""The work of one rank in the FSDP2 parity suite, and the single-rank reference (same code).

A case builds the tiny Wan model under a layout (TP/SP, CP, PP), loads the reference weights sliced to its
TP shard, optionally adds LoRA (frozen base), wraps it in FSDP2 (`fsdp`) or megatron-core DDP, and runs two
steps: a NON-LINEAR per-sample loss through megatron-core's schedule, the gradient norm, clipping, AdamW
(the trainer's optimizer_step). It returns the losses and gradient norms of both steps, the first step's
gradients (before clipping) and the parameters after both steps, gathered to full shape under global
names, for comparison with the world-1 megatron-DDP run.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from _cases import ARCHS, BETA, PAIRS, SFT, TOKENS, _global_names, _rank, _shard, _size, _unshard

OPTIM = SimpleNamespace(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-3, clip_grad=0.5)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _build(layout: dict, payload: dict):
    from megatron_regdpo.models.lora import apply_lora
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.parallel.data_parallel import wrap_data_parallel
    from megatron_regdpo.parallel.groups import init_distributed
    from megatron_regdpo.training.optimizer import build_optimizer

    tp, pp, cp = layout.get("tp", 1), layout.get("pp", 1), layout.get("cp", 1)
    par = SimpleNamespace(tp=tp, pp=pp, cp=cp, sequence_parallel=layout.get("sp", False), virtual_pp=None,
                          distributed_optimizer=False, fsdp=layout.get("fsdp", False), grad_reduce_in_fp32=True)
    pg = init_distributed(tp, pp, cp)
    dtype = torch.bfloat16 if layout.get("bf16") else torch.float32
    model = build_wan(ARCHS["t2v"], pg, parallel=par, init_weights=False, recompute=layout.get("recompute", "none"),
                      params_dtype=dtype)
    names = _global_names(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_shard(payload["weights"][names[name]], p, pg.tp))
    if layout.get("lora"):
        apply_lora(model, 4, 8.0, ("linear_qkv", "linear_proj", "linear_fc2"))
        names = _global_names(model)
    tags = {n: p for n, p in model.named_parameters()}  # TP marks, read before wrapping
    chunk = wrap_data_parallel(model, par, pg)
    opt = build_optimizer(OPTIM, par, dtype, [chunk], pg)
    return SimpleNamespace(par=par, pg=pg, model=model, chunk=chunk, opt=opt, names=names, tags=tags,
                           clip=layout.get("clip", OPTIM.clip_grad))


def _train_step(run, payload: dict, result: dict, keep_grads: bool = False) -> None:
    """One step of the case's pairs: forward/backward through the schedule, norm, clip, AdamW."""
    from megatron_regdpo.objectives.per_sample import sum_across_group
    from megatron_regdpo.parallel.pipeline import forward_backward
    from megatron_regdpo.training.optimizer import optimizer_step, set_lr

    pg, model, chunk, opt = run.pg, run.model, run.chunk, run.opt
    dp_rank, dp_size = _rank(pg.dp), _size(pg.dp)
    per_dp = PAIRS // dp_size
    my_pairs = list(range(dp_rank * per_dp, (dp_rank + 1) * per_dp))

    def forward_step(data_iterator, wrapped):
        b = {k: v if v is None or k == "t" else v.to(model.config.params_dtype)
             for k, v in payload["pairs"][next(data_iterator)].items()}
        out = wrapped(b["x"], b["t"], b["text"], b["image"], return_tokens=True)

        def loss_func(out_BSP):
            target = model.cp_chunk(model.patchify(b["target"]))
            err = sum_across_group((out_BSP.float() - target).pow(2).sum(dim=(1, 2)), pg.cp) / b["target"][0].numel()
            loss = -F.logsigmoid(-BETA * (err[0] - err[1])) + SFT * err[0]
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    if hasattr(chunk, "zero_grad_buffer"):
        chunk.zero_grad_buffer()
    opt.zero_grad()
    losses = forward_backward([chunk], forward_step, iter(my_pairs), num_microbatches=per_dp, tokens=TOKENS,
                              micro_batch_size=2, pg_collection=pg)
    loss = torch.tensor([sum(float(l["loss"]) for l in losses) / per_dp if losses else 0.0])
    dist.all_reduce(loss, group=pg.pp)
    dist.all_reduce(loss, group=pg.dp)
    result.setdefault("losses", []).append(float(loss) / dp_size)
    if keep_grads:
        result["grads"] = {}
        for n, p in model.named_parameters():
            g = p.main_grad if hasattr(p, "main_grad") else p.grad
            if p.requires_grad and g is not None:
                result["grads"][run.names[n]] = _unshard(_full(g), run.tags[n], pg.tp)
    set_lr(opt, OPTIM.lr, OPTIM.weight_decay)
    applied, norm = optimizer_step(opt, result["losses"][-1], run.clip)
    assert applied
    result.setdefault("norms", []).append(norm)


def _params(run) -> dict:
    return {run.names[n]: _unshard(_full(p.detach()), run.tags[n], run.pg.tp)
            for n, p in run.model.named_parameters() if p.requires_grad}


def _coords(pg) -> dict:
    return {"tp": _rank(pg.tp), "pp": _rank(pg.pp), "cp": _rank(pg.cp), "dp": _rank(pg.dp)}


def run_fsdp_case(layout: dict, payload: dict) -> dict:
    """Two steps; the first step's gradients and the parameters after both."""
    if "resume" in layout or "save_at" in layout:
        return run_resume_case(layout, payload)
    run = _build(layout, payload)
    result = {"layout": layout, "coords": _coords(run.pg)}
    for step in range(2):
        _train_step(run, payload, result, keep_grads=step == 0)
    result["params"] = _params(run)
    return result


def run_resume_case(layout: dict, payload: dict) -> dict:
    """`save_at`: train, checkpoint (Checkpointer) after that many steps, train one more step.
    `resume`: load that checkpoint folder, train one step. Returns the losses/norms and final parameters."""
    from megatron_regdpo.training.checkpoint import Checkpointer

    run = _build(layout, payload)
    result = {"layout": layout, "coords": _coords(run.pg)}
    if "resume" in layout:
        ckpt = Checkpointer(layout["resume"])
        state = ckpt.load(ckpt.latest(), [run.chunk], run.opt)
        result["resumed_step"] = int(state["step"])
        result["loaded_state"] = optimizer_state(run)
    else:
        for _ in range(layout["save_at"]):
            _train_step(run, payload, result)
        Checkpointer(layout["save_dir"]).save(layout["save_at"], [run.chunk], run.opt, {})
        result["saved_params"] = _params(run)
        result["saved_state"] = optimizer_state(run)
    _train_step(run, payload, result)
    result["params"] = _params(run)
    return result


def optimizer_state(run) -> dict:
    """{global name: {master, exp_avg, exp_avg_sq, step}} in full fp32 shape, FSDP2 or megatron-core's optimizer
    (one whose leaves are not distributed); the master is the fp32 weight the optimizer updates."""
    out = {}
    if run.par.fsdp:
        opt, names = run.opt.optimizer, run.names
        for n, p in run.model.named_parameters():
            if p.requires_grad:
                st = opt.state[p]
                out[names[n]] = {"master": p, "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"],
                                 "step": float(st["step"])}
    else:
        (leaf,) = run.opt.chained_optimizers
        models = [p for g in getattr(leaf, "float16_groups", [g["params"] for g in leaf.optimizer.param_groups])
                  for p in g]
        masters = [p for g in getattr(leaf, "fp32_from_float16_groups", [g["params"] for g in leaf.optimizer.param_groups])
                   for p in g]
        by_id = {id(p): n for n, p in run.model.named_parameters()}
        for model_p, master in zip(models, masters):
            st = leaf.optimizer.state[master]
            out[run.names[by_id[id(model_p)]]] = {"master": master, "exp_avg": st["exp_avg"],
                                                  "exp_avg_sq": st["exp_avg_sq"], "step": float(st["step"])}
    tp_tags = {run.names[n]: run.tags[n] for n in run.tags}
    return {k: {f: v if f == "step" else _unshard(_full(v.detach()).float(), tp_tags[k], run.pg.tp)
                for f, v in d.items()} for k, d in out.items()}


def reference_errors_case(layout: dict, payload: dict) -> dict:
    """The reference errors of `layout['mode']` for every pair of the payload, from a policy that took two steps
    (so policy and reference differ): lora_base (LoRA policy) or resident (full fine-tuning); FSDP2 or not."""
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.reference import ReferenceBatch, build_reference

    run = _build(layout, payload)
    result = {"layout": layout, "coords": _coords(run.pg)}
    mode = layout["mode"]
    shard = None
    if run.par.fsdp:
        from megatron_regdpo.parallel.fsdp2 import FSDP2Model

        shard = lambda m: FSDP2Model(m, run.pg, torch.float32).module  # noqa: E731
    ref = build_reference(mode, run.chunk, build_model=lambda: build_wan(ARCHS["t2v"], run.pg, parallel=run.par,
                                                                      init_weights=False),
                          checkpoint=layout.get("checkpoint"), cp_group=run.pg.cp, shard=shard)
    for _ in range(2):
        _train_step(run, payload, result)
    errs = {}
    for i, b in enumerate(payload["pairs"]):
        batch = ReferenceBatch(x_t=b["x"], timestep=b["t"], text=b["text"], target=b["target"], image=b["image"])
        w, l = ref(batch)
        errs[i] = torch.cat([w, l])
    result["errs"] = errs
    model = getattr(ref, "model", None)
    if model is not None:
        result["ref_numel"] = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                  for p in model.parameters())
    return result


def run_fsdp_cases(rank: int, world: int, payload: dict) -> list:
    from megatron_regdpo.parallel.groups import destroy_distributed, init_distributed

    init_distributed(rank=rank, world_size=world)
    try:
        cases = {"train": run_fsdp_case, "reference": reference_errors_case}
        return [cases[layout.get("case", "train")](layout, payload["t2v"]) for layout in payload["layouts"]]
    finally:
        destroy_distributed()

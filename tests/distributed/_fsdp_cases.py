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

OPTIM = SimpleNamespace(lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-3, clip_grad=0.5)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_fsdp_case(layout: dict, payload: dict) -> dict:
    from megatron_regdpo.models.lora import apply_lora
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.objectives.per_sample import sum_across_group
    from megatron_regdpo.parallel.data_parallel import wrap_data_parallel
    from megatron_regdpo.parallel.groups import init_distributed
    from megatron_regdpo.parallel.pipeline import forward_backward
    from megatron_regdpo.training.optimizer import build_optimizer, optimizer_step

    tp, pp, cp = layout.get("tp", 1), layout.get("pp", 1), layout.get("cp", 1)
    par = SimpleNamespace(tp=tp, pp=pp, cp=cp, sequence_parallel=layout.get("sp", False), virtual_pp=None,
                          distributed_optimizer=False, fsdp=layout.get("fsdp", False), grad_reduce_in_fp32=True)
    pg = init_distributed(tp, pp, cp)
    model = build_wan(ARCHS["t2v"], pg, parallel=par, init_weights=False,
                      recompute=layout.get("recompute", "none"))
    names = _global_names(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_shard(payload["weights"][names[name]], p, pg.tp))
    if layout.get("lora"):
        apply_lora(model, 4, 8.0, ("linear_qkv", "linear_proj", "linear_fc2"))
        names = _global_names(model)
    clip = layout.get("clip", OPTIM.clip_grad)
    tags = {n: p for n, p in model.named_parameters()}  # TP marks, read before wrapping
    chunk = wrap_data_parallel(model, par, pg)
    if par.fsdp:  # TEMP until training/optimizer.py dispatches
        from megatron_regdpo.training.fsdp2_optimizer import FSDP2AdamW
        opt = FSDP2AdamW(chunk, OPTIM)
    else:
        opt = build_optimizer(OPTIM, par, torch.float32, [chunk], pg)

    dp_rank, dp_size = _rank(pg.dp), _size(pg.dp)
    per_dp = PAIRS // dp_size
    my_pairs = list(range(dp_rank * per_dp, (dp_rank + 1) * per_dp))
    result = {"layout": layout, "losses": [], "norms": [], "coords": {"tp": _rank(pg.tp), "pp": _rank(pg.pp),
                                                                      "cp": _rank(pg.cp), "dp": dp_rank}}

    def forward_step(data_iterator, wrapped):
        b = payload["pairs"][next(data_iterator)]
        out = wrapped(b["x"], b["t"], b["text"], b["image"], return_tokens=True)

        def loss_func(out_BSP):
            target = model.cp_chunk(model.patchify(b["target"]))
            err = sum_across_group((out_BSP.float() - target).pow(2).sum(dim=(1, 2)), pg.cp) / b["target"][0].numel()
            loss = -F.logsigmoid(-BETA * (err[0] - err[1])) + SFT * err[0]
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    for step in range(2):
        if hasattr(chunk, "zero_grad_buffer"):
            chunk.zero_grad_buffer()
        opt.zero_grad()
        losses = forward_backward([chunk], forward_step, iter(my_pairs), num_microbatches=per_dp, tokens=TOKENS,
                                  micro_batch_size=2, pg_collection=pg)
        loss = torch.tensor([sum(float(l["loss"]) for l in losses) / per_dp if losses else 0.0])
        dist.all_reduce(loss, group=pg.pp)
        dist.all_reduce(loss, group=pg.dp)
        result["losses"].append(float(loss) / dp_size)
        if step == 0:
            result["grads"] = {}
            for n, p in model.named_parameters():
                g = p.main_grad if hasattr(p, "main_grad") else p.grad
                if p.requires_grad and g is not None:
                    result["grads"][names[n]] = _unshard(_full(g), tags[n], pg.tp)
        if par.fsdp:  # TEMP
            opt.prepare_grads(); norm = opt.get_grad_norm(); opt.clip_grads(clip, norm)
            applied = opt.step_with_ready_grads()
        else:
            applied, norm = optimizer_step(opt, result["losses"][-1], clip)
        assert applied
        result["norms"].append(norm)
    result["params"] = {names[n]: _unshard(_full(p.detach()), tags[n], pg.tp)
                        for n, p in model.named_parameters() if p.requires_grad}
    return result


def run_fsdp_cases(rank: int, world: int, payload: dict) -> list:
    from megatron_regdpo.parallel.groups import destroy_distributed, init_distributed

    init_distributed(rank=rank, world_size=world)
    try:
        return [run_fsdp_case(layout, payload["t2v"]) for layout in payload["layouts"]]
    finally:
        destroy_distributed()

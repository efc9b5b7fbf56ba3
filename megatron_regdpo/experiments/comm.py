"""Bytes communicated per training step, per layout, measured against comm_model's expectation.

Each layout runs one Reg-DPO step (policy forward/backward through megatron-core's schedule and
gradient finalisation) of a small Wan model on spawned gloo ranks, with every collective counted.
The reference pass is not included (it adds the forward-only share of the TP/CP/PP traffic).
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from megatron_regdpo.models.wan.arch import WanArch

ARCH = WanArch(num_layers=4, num_heads=4, head_dim=16, ffn_dim=128, text_dim=32, freq_dim=32)
LATENT, TEXT, PAIRS = (3, 4, 8), 7, 4          # 24 tokens per sample; 4 pairs per step
LAYOUTS = {  # world = tp*pp*cp*dp
    "TP2": dict(world=2, tp=2), "TP2+SP": dict(world=2, tp=2, sp=True), "CP2": dict(world=2, cp=2),
    "PP2": dict(world=2, pp=2), "DP2": dict(world=2), "DP2-distopt": dict(world=2, dist_opt=True),
    "CP4": dict(world=4, cp=4), "PP4": dict(world=4, pp=4), "TP2xCP2": dict(world=4, tp=2, cp=2, sp=True),
    "TP2xPP2": dict(world=4, tp=2, pp=2), "CP2xDP2": dict(world=4, cp=2), "PP2xDP2": dict(world=4, pp=2),
    "I2V-TP2+SP": dict(world=2, tp=2, sp=True, task="i2v"),
}


def _micro_batches(arch: WanArch, pairs: list[int]) -> list[dict]:
    out = []
    for pid in pairs:
        g = torch.Generator().manual_seed(pid)
        b = 2
        x = torch.randn(b, arch.in_channels, *LATENT, generator=g)
        out.append(dict(x_t=x, timestep=torch.rand(b, generator=g) * 1000, target=torch.randn(b, arch.out_channels, *LATENT, generator=g),
                        text=torch.randn(b, TEXT, arch.text_dim, generator=g),
                        image=torch.randn(b, arch.image_tokens, arch.image_dim, generator=g) if arch.image_dim else None,
                        err_ref_w=torch.rand(1, generator=g) + 1, err_ref_l=torch.rand(1, generator=g) + 1))
    return out


def measure_layout(name: str, layout: dict, world: int) -> dict:
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.objectives.reg_dpo import RegDPOSettings
    from megatron_regdpo.parallel.comm_count import count_collectives
    from megatron_regdpo.parallel.comm_model import StepShape, expected_bytes
    from megatron_regdpo.parallel.data_parallel import wrap_data_parallel
    from megatron_regdpo.parallel.groups import init_distributed
    from megatron_regdpo.parallel.pipeline import forward_backward
    from megatron_regdpo.training.step import make_forward_step

    tp, pp, cp, sp = layout.get("tp", 1), layout.get("pp", 1), layout.get("cp", 1), layout.get("sp", False)
    arch = ARCH if layout.get("task", "t2v") == "t2v" else dataclasses.replace(
        ARCH, in_channels=36, image_dim=24, image_tokens=5)
    par = SimpleNamespace(tp=tp, pp=pp, cp=cp, sequence_parallel=sp, virtual_pp=None, fsdp=False,
                          distributed_optimizer=layout.get("dist_opt", False), grad_reduce_in_fp32=False)
    pg = init_distributed(tp, pp, cp)
    model = build_wan(arch, pg, parallel=par)
    ddp = wrap_data_parallel(model, par, pg)
    dp, dp_rank = torch.distributed.get_world_size(pg.dp), torch.distributed.get_rank(pg.dp)
    per_dp = PAIRS // dp
    mbs = _micro_batches(arch, list(range(dp_rank * per_dp, (dp_rank + 1) * per_dp)))
    step = make_forward_step(RegDPOSettings(beta=50.0), pg.cp)
    tokens = (LATENT[0] * LATENT[1] * LATENT[2]) // 4
    with count_collectives() as counter:
        forward_backward([ddp], step, iter(mbs), num_microbatches=per_dp, tokens=tokens, micro_batch_size=2,
                         pg_collection=pg)
    pp_rank = torch.distributed.get_rank(pg.pp)
    shape = StepShape(hidden=arch.hidden, layers=arch.num_layers, tokens=tokens, text_tokens=TEXT,
                      image_tokens=arch.image_tokens if arch.image_dim else 0, samples=2, microbatches=per_dp)
    expected = expected_bytes(shape, tp, cp, pp, dp, sp, pp_rank,
                              local_params=sum(p.numel() for p in model.parameters()),
                              cond_params=sum(p.numel() for p in model.condition.parameters()),
                              dist_opt=par.distributed_optimizer)
    return {"layout": name, "world": world, "rank": torch.distributed.get_rank(),
            "coords": dict(tp=torch.distributed.get_rank(pg.tp), cp=torch.distributed.get_rank(pg.cp),
                           pp=pp_rank, dp=dp_rank),
            "measured": counter.summary(), "expected": expected,
            "measured_total": counter.total, "expected_total": sum(expected.values())}


def run_layouts(rank: int, world: int, names: list[str]) -> list[dict]:
    """Spawned-world entry point: measure every named layout whose size is `world`."""
    from megatron_regdpo.parallel.groups import destroy_distributed, init_distributed

    init_distributed(rank=rank, world_size=world)
    try:
        return [measure_layout(n, LAYOUTS[n], world) for n in names]
    finally:
        destroy_distributed()

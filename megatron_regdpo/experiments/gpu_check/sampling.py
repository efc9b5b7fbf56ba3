"""(e) Negative sampling: seconds per clip for the 1.3B model at 480p, 81 frames, 50 UniPC steps with CFG.

The sampler is the one data/negatives uses (Wan's UniPC flow scheduler grid, schedules.py; CFG as one
forward of a doubled batch, generate.guided_velocity, as `make_gt_pairs generate` runs it by default) over
our Wan in bf16, with random weights (weights.py) and random text embeddings: time does not depend on the values.
One step is run first (warm-up), then as many of the 50 as the step's time allows, timed; when that is
fewer than 50, seconds per clip = seconds per step x 50 (`extrapolated`: the solver's own arithmetic is
negligible beside two 1.3B forwards per step).
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_regdpo.config import load_config, validate
from megatron_regdpo.data.negatives.flow import sample
from megatron_regdpo.data.negatives.generate import guided_velocity, keyed_noise
from megatron_regdpo.data.negatives.schedules import FlowScheduler
from megatron_regdpo.models.wan.arch import resolve_arch
from megatron_regdpo.models.wan.build import build_wan
from megatron_regdpo.models.wan.flops import wan_forward_flops
from megatron_regdpo.parallel.groups import distributed_session

from .sizes import RECIPE
from .timing import seconds
from .weights import randomize_linears_


@torch.no_grad()
def run(ctx) -> dict:
    s = ctx.sizes
    cfg = load_config(str(Path(ctx.repo_root) / RECIPE), [*s.overrides, f"data.frames={s.main_frames}"])
    arch = resolve_arch(cfg.model)
    latent = validate(cfg, 1, arch).latent_shape
    dtype, dev = torch.bfloat16, torch.device(ctx.device)
    with distributed_session(world_size=1) as pg:
        model = build_wan(arch, pg, params_dtype=dtype, backend="local", init_weights=False).to(dev).eval()
        randomize_linears_(model)
        gen = torch.Generator().manual_seed(0)
        text, negative = (torch.randn(cfg.data.text_len, arch.text_dim, generator=gen).to(dev, dtype) for _ in range(2))
        velocity = guided_velocity(model, text, negative, None, dtype, s.guidance, cfg_batch=True)
        noise = keyed_noise((arch.out_channels, *latent), 0, "gpu_check", 0)[None].to(dev)
        schedule = FlowScheduler(kind="unipc", shift=s.sample_shift).schedule(s.sample_steps)
        warm_s = seconds(lambda: sample(velocity, noise, schedule.head(1)), dev)
        steps = max(1, min(s.sample_steps, int(0.8 * (ctx.time_left() - 3) / max(warm_s, 1e-3))))
        run_s = seconds(lambda: sample(velocity, noise, schedule.head(steps)), dev)
        del model
    per_step = run_s / steps
    fwd = wan_forward_flops(arch, 1, latent, cfg.data.text_len)["total"]
    matmul = ctx.result_of("environment").get("matmul_tflops")
    out = {"arch": cfg.model.size, "latent": list(latent), "text_len": cfg.data.text_len, "dtype": "bfloat16",
           "solver": "unipc", "cfg": "one doubled batch", "guidance": s.guidance, "shift": s.sample_shift, "steps_per_clip": s.sample_steps,
           "steps_timed": steps, "extrapolated": steps < s.sample_steps, "warmup_step_s": warm_s,
           "seconds_per_step": per_step,
           "seconds_per_clip": per_step * s.sample_steps if steps < s.sample_steps else run_s,
           "forward_tflop": fwd / 1e12, "tflops": 2 * fwd / per_step / 1e12}
    if matmul:
        out["mfu"] = out["tflops"] / matmul
    return out


def summary(r: dict) -> str:
    how = f"extrapolated from {r['steps_timed']} steps" if r["extrapolated"] else "measured"
    mfu = f", MFU {r['mfu']:.2f}" if "mfu" in r else ""
    return f"{r['seconds_per_clip']:.4g} s per clip ({r['steps_per_clip']} steps, CFG {r['guidance']:g}, {how}){mfu}"

"""The smoke step `make demo` runs until the Reg-DPO trainer lands: one real step of the real model.

Build the recipe's model, run a flow-matching forward/backward on synthetic latents (winner and loser
of one pair sharing noise and timestep), take one AdamW step, save a Megatron distributed checkpoint,
reload it into a freshly built model and check the outputs are bitwise equal.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from megatron_regdpo.config import video_tokens
from megatron_regdpo.config.mcore import DTYPES
from megatron_regdpo.models.wan.arch import resolve_arch
from megatron_regdpo.models.wan.build import build_wan, count_parameters
from megatron_regdpo.models.wan.convert import FAMILY
from megatron_regdpo.objectives.flow_matching import make_pair_batch
from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model, save_model
from megatron_regdpo.parallel.groups import distributed_session


def synthetic_pair(arch, data, seed: int):
    """A winner/loser latent pair noised with the objective's keyed noise and timestep (shared by both),
    plus text (and image) conditioning."""
    g = torch.Generator().manual_seed(seed)
    _, latent = video_tokens(data.frames, data.height, data.width)
    x0 = torch.randn(2, 1, arch.out_channels, *latent, generator=g)
    pb = make_pair_batch(x0[0], x0[1], [0], seed=seed, step=0)
    x_t = pb.x_t_BCFHW
    if arch.in_channels > arch.out_channels:  # I2V: mask + first-frame latent channels
        cond = torch.randn(1, arch.in_channels - arch.out_channels, *latent, generator=g).expand(2, -1, -1, -1, -1)
        x_t = torch.cat([x_t, cond], dim=1)
    text = torch.randn(1, data.text_len, arch.text_dim, generator=g).expand(2, -1, -1)
    image = (torch.randn(1, arch.image_tokens, arch.image_dim, generator=g).expand(2, -1, -1)
             if arch.image_dim else None)
    return x_t, pb.timestep_B, text, image, pb.target_BCFHW


def run_smoke(cfg) -> int:
    arch = resolve_arch(cfg.model)
    dtype = DTYPES[cfg.precision.params_dtype]
    out_dir = Path(cfg.run.output_dir) / cfg.run.name
    ckpt_dir = out_dir / "smoke_ckpt"  # a demo artifact: each run replaces the previous one
    torch.manual_seed(cfg.run.seed)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    with distributed_session(world_size=1) as pg:
        model = build_wan(arch, pg, params_dtype=dtype, backend=cfg.model.backend)
        print(f"built Wan2.1 {cfg.model.size} ({arch.task}): {count_parameters(model):,} parameters")
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        x_t, t, text, image, v = synthetic_pair(arch, cfg.data, cfg.run.seed)
        t0 = time.perf_counter()
        pred = model(x_t.to(dtype), t, text.to(dtype), None if image is None else image.to(dtype))
        err = (pred.float() - v).pow(2).mean(dim=(1, 2, 3, 4))  # per-sample velocity MSE
        err.mean().backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        opt.step()
        print(f"forward/backward: err winner {err[0].item():.4f} loser {err[1].item():.4f}, "
              f"grad norm {grad_norm.item():.4f}, {time.perf_counter() - t0:.2f} s")

        save_model(model, ckpt_dir, {"family": FAMILY, "arch": arch.__dict__ | {"patch": list(arch.patch)},
                                     "dtype": str(dtype)})
        reloaded = build_wan(arch, pg, params_dtype=dtype, backend=cfg.model.backend, init_weights=False)
        load_model(reloaded, ckpt_dir)
        with torch.no_grad():
            a = model(x_t.to(dtype), t, text.to(dtype), None if image is None else image.to(dtype))
            b = reloaded(x_t.to(dtype), t, text.to(dtype), None if image is None else image.to(dtype))
        same = torch.equal(a, b)
        print(f"checkpoint {ckpt_dir}: saved and reloaded, outputs {'bitwise equal' if same else 'DIFFER'}")
        return 0 if same else 1

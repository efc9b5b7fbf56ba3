"""Small inputs for trainer-level distributed tests: a GT-Pair store of random latents in the debug recipe's
shape (no video decoded) and a base checkpoint of the debug model saved by one rank."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

ATTRS = {"task": "t2v", "fps": 16, "frames": 9, "short_side": 64, "bucket": "1:1", "latent_dtype": "bf16",
         "text_len": 16, "text_encoder": {"dim": 32}}


def make_store(path: Path, pairs: int) -> Path:
    """`pairs` GT pairs of recipes/debug/tiny_cpu.yaml's latent shape, random latents."""
    from megatron_regdpo.data.store import GTPairStore

    store = GTPairStore.open_or_create(path, ATTRS)
    for i in range(pairs):
        store.write_text(f"p{i}", torch.randn(16, 32), torch.arange(16) < 4, f"c{i}")
        store.write_real(f"r{i}", torch.randn(16, 3, 8, 8), {"prompt_id": f"p{i}"})
        store.write_generated(f"r{i}.g", torch.randn(16, 3, 8, 8), {"real_id": f"r{i}", "generator": "g", "k": 0})
    store.finalize()
    return path


def save_base(path: Path, pg) -> Path:
    """The debug model's random initial weights as a model checkpoint: a random init depends on the layout
    (a pipeline stage builds only its layers), a loaded checkpoint does not."""
    from megatron_regdpo.checkpoint_io.megatron_ckpt import save_model
    from megatron_regdpo.models.wan.arch import SIZES
    from megatron_regdpo.models.wan.build import build_wan

    save_model(build_wan(SIZES["debug"], pg), path, {"family": "wan2.1", "arch": dataclasses.asdict(SIZES["debug"]),
                                                     "dtype": "torch.float32"})
    return path

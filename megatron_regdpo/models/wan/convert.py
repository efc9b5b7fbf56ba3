"""Wan checkpoint conversion: diffusers folder <-> Megatron-Core distributed checkpoint, and a numerical check.

Runs on one process (TP1/PP1); dist_checkpointing reshards the result for any layout at load time.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megatron_regdpo.checkpoint_io.engine import check_keys, to_ours, to_theirs
from megatron_regdpo.checkpoint_io.hf_folder import HFReader, write_hf_folder
from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model, read_meta, save_model

from ..lora import apply_lora, merged_state_dict
from .arch import WanArch
from .build import build_wan
from .mapping import IGNORED_DIFFUSERS_KEYS, wan_rules

FAMILY = "wan2.1"


def _own_keys(model) -> list[str]:
    return [k for k in model.state_dict() if not k.endswith("_extra_state")]


def arch_from_meta(meta: dict) -> WanArch:
    if meta.get("family") != FAMILY:
        raise ValueError(f"checkpoint family {meta.get('family')!r} is not {FAMILY!r}")
    arch = dict(meta["arch"])
    arch["patch"] = tuple(arch["patch"])
    return WanArch(**arch)


@torch.no_grad()
def import_diffusers(hf_dir: str | Path, out_dir: str | Path, pg) -> WanArch:
    reader = HFReader(hf_dir)
    arch = WanArch.from_diffusers_config(reader.config)
    rules = wan_rules(arch)
    check_keys(reader.keys(), [n for r in rules for n in r.theirs], f"{hf_dir}", ignore=IGNORED_DIFFUSERS_KEYS)
    dtype = reader.read(rules[0].theirs[0]).dtype
    model = build_wan(arch, pg, params_dtype=dtype, init_weights=False)
    check_keys(_own_keys(model), [r.ours for r in rules], "megatron model")
    params = model.state_dict()
    for name, tensor in to_ours(rules, reader.read, arch.num_heads):
        if params[name].shape != tensor.shape:
            raise ValueError(f"{hf_dir}: {name} has shape {tuple(tensor.shape)}, model wants {tuple(params[name].shape)}")
        params[name].copy_(tensor)
    save_model(model, out_dir, {"family": FAMILY, "arch": dataclasses.asdict(arch), "dtype": str(dtype)})
    return arch


def load_checkpoint(ckpt_dir: str | Path, pg, params_dtype: torch.dtype | None = None):
    meta = read_meta(ckpt_dir)
    arch = arch_from_meta(meta)
    dtype = params_dtype or getattr(torch, meta.get("dtype", "torch.float32").removeprefix("torch."))
    model = build_wan(arch, pg, params_dtype=dtype, init_weights=False)
    if meta.get("lora"):  # a LoRA checkpoint: rebuild the adapters it holds (else they would be dropped)
        apply_lora(model, meta["lora"]["rank"], meta["lora"]["alpha"], tuple(meta["lora"]["targets"]))
    load_model(model, ckpt_dir)
    return model, arch


@torch.no_grad()
def export_diffusers(ckpt_dir: str | Path, out_dir: str | Path, pg, max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    import diffusers

    model, arch = load_checkpoint(ckpt_dir, pg)
    params = merged_state_dict(model)  # adapters (if any) merged into the base weights
    config = {"_class_name": "WanTransformer3DModel", "_diffusers_version": diffusers.__version__,
              **arch.diffusers_config()}
    stream = to_theirs(wan_rules(arch), params.__getitem__, arch.num_heads)
    return write_hf_folder(out_dir, config, stream, max_shard_bytes)


def random_inputs(arch: WanArch, batch: int = 2, latent=(3, 8, 12), text_len: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, arch.in_channels, *latent, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    txt = torch.randn(batch, text_len, arch.text_dim, generator=g)
    img = torch.randn(batch, arch.image_tokens, arch.image_dim, generator=g) if arch.image_dim else None
    return x, t, txt, img


@torch.no_grad()
def verify(hf_dir: str | Path, ckpt_dir: str | Path, pg) -> dict:
    """Run diffusers' model (from hf_dir) and ours (from ckpt_dir) in fp32 on one random input."""
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    ours, arch = load_checkpoint(ckpt_dir, pg, params_dtype=torch.float32)
    ours.eval()
    x, t, txt, img = random_inputs(arch)  # 512 text tokens: diffusers' I2V split assumes it
    want = ref(x, t, txt, encoder_hidden_states_image=img, return_dict=False)[0]
    got = ours(x, t, txt, img)
    max_abs = (got - want).abs().max().item()
    return {"max_abs": max_abs, "max_rel": max_abs / max(want.abs().max().item(), 1e-30)}

"""Export of a LoRA'd Wan model: merged diffusers weights, or the adapter alone in PEFT/diffusers format.

Runs on one full model (TP1/PP1): load the training checkpoint there (`load_lora_checkpoint`;
dist_checkpointing reshards any layout), then export.

The adapter file is what diffusers' `WanLoraLoaderMixin.save_lora_weights` writes:
`<dir>/pytorch_lora_weights.safetensors` with keys `transformer.blocks.{i}.attn1.to_q.lora_A.weight` and a
`lora_adapter_metadata` JSON entry holding PEFT's LoraConfig (`transformer.r`, `transformer.lora_alpha`,
`transformer.target_modules`). The scale alpha/r is folded into lora_B and the config says lora_alpha = r
(scale 1): every loader then applies the same update, including `load_lora_adapter(file)`, which ignores the
metadata and assumes scale 1 (with alpha != r an unfolded export was off by 0.8 relative there). The trained
alpha is kept for the record in the file's `megatron_regdpo` metadata entry. Tested to give our output
(tests/distributed/test_lora_loaders.py): `pipe.load_lora_weights(dir)`, and on the transformer
`load_lora_adapter(file)`, `(file, use_safetensors=True)`, `(dir, use_safetensors=True)` and
`(dir, weight_name="pytorch_lora_weights.safetensors")`, and `load_lora_adapter(dir)`: given a folder alone,
diffusers 0.42 reads `pytorch_lora_weights.bin`, so the same tensors are written there too (plain tensors,
loaded with weights_only; the folded scale needs no metadata).

Our fused projections are unfused through the conversion table: lora_A acts on the input, which q, k and v
share, so each of diffusers' to_q/to_k/to_v gets the same A; B's rows split per head like W's
(`engine.unfuse_heads`), giving B_q, B_k, B_v.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_regdpo.checkpoint_io.engine import to_theirs, unfuse_heads
from megatron_regdpo.checkpoint_io.hf_folder import write_hf_folder
from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model, read_meta

from ..lora import apply_lora, lora_modules, lora_settings, merged_state_dict
from .arch import WanArch
from .build import build_wan
from .convert import FAMILY, arch_from_meta
from .mapping import wan_rules

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
ADAPTER_FILE_PICKLED = "pytorch_lora_weights.bin"   # diffusers' LORA_WEIGHT_NAME (a folder alone reads it)
METADATA_KEY = "lora_adapter_metadata"              # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer"                               # WanLoraLoaderMixin.transformer_name


def _require_full_model(model) -> None:
    tp = torch.distributed.get_world_size(model.tp_group)
    if tp != 1 or not (model.pre_process and model.post_process):
        raise ValueError(f"export needs the whole model on one rank (got TP {tp}, pre/post stage "
                         f"{model.pre_process}/{model.post_process}); load the checkpoint at TP1/PP1")


def load_lora_checkpoint(ckpt_dir: str | Path, pg, params_dtype: torch.dtype | None = None):
    """Build the model a checkpoint's model.json describes, with its adapters (`meta["lora"]`), and load it."""
    meta = read_meta(ckpt_dir)
    arch = arch_from_meta(meta)
    if not meta.get("lora"):
        raise ValueError(f"{ckpt_dir}: model.json records no LoRA adapters (no 'lora' entry)")
    dtype = params_dtype or getattr(torch, meta.get("dtype", "torch.float32").removeprefix("torch."))
    model = build_wan(arch, pg, params_dtype=dtype, init_weights=False)
    apply_lora(model, meta["lora"]["rank"], meta["lora"]["alpha"], tuple(meta["lora"]["targets"]))
    load_model(model, ckpt_dir)
    return model, arch


def lora_meta(model) -> dict:
    """The `lora` entry of model.json for a checkpoint of `model` (read by load_lora_checkpoint)."""
    settings = lora_settings(model)
    if settings is None:
        raise ValueError("the model has no LoRA adapters")
    return settings


@torch.no_grad()
def merged_diffusers_tensors(model, arch: WanArch):
    """Stream (diffusers name, tensor) of the base weights with every adapter merged in."""
    _require_full_model(model)
    params = merged_state_dict(model)
    yield from to_theirs(wan_rules(arch), params.__getitem__, arch.num_heads)


def export_merged(model, arch: WanArch, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """A diffusers WanTransformer3DModel folder of the merged weights."""
    import diffusers

    config = {"_class_name": "WanTransformer3DModel", "_diffusers_version": diffusers.__version__,
              **arch.diffusers_config()}
    return write_hf_folder(out_dir, config, merged_diffusers_tensors(model, arch), max_shard_bytes)


@torch.no_grad()
def peft_adapter_tensors(model, arch: WanArch, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """{"transformer.blocks.0.attn1.to_q.lora_A.weight": A, ...} in diffusers' module names."""
    _require_full_model(model)
    adapters = {name: m for name, m in lora_modules(model)}
    out: dict[str, torch.Tensor] = {}
    for rule in wan_rules(arch):
        ours = rule.ours.removesuffix(".weight")
        if ours == rule.ours or ours not in adapters:
            continue
        m = adapters.pop(ours)
        if m.lora_merged:
            raise ValueError(f"{ours}: adapters are merged into the base weights; unmerge_lora(model) first")
        theirs = [t.removesuffix(".weight") for t in rule.theirs]
        # fused rows are output rows: only a column-parallel layer's B can be split per head
        assert rule.fuse is None or m.lora_kind == "column", rule
        b_scaled = m.lora_B * m.lora_scaling  # alpha/r folded in: the file's adapters have scale 1
        bs = unfuse_heads(b_scaled, arch.num_heads, len(theirs)) if rule.fuse == "heads" else [b_scaled]
        for name, b in zip(theirs, bs):
            out[f"{prefix}.{name}.lora_A.weight"] = m.lora_A.detach().clone().contiguous()
            out[f"{prefix}.{name}.lora_B.weight"] = b.detach().clone().contiguous()
    if adapters:
        raise ValueError(f"no diffusers name for the adapters of {sorted(adapters)[:6]} (not in the mapping table)")
    return out


def peft_metadata(model, tensors: dict[str, torch.Tensor], prefix: str = PREFIX) -> dict:
    """PEFT LoraConfig fields, prefixed as diffusers' save_lora_weights writes them."""
    settings = lora_meta(model)
    targets = sorted({k.removeprefix(f"{prefix}.").split(".lora_")[0] for k in tensors})
    # lora_alpha = r: the scale alpha/r is in lora_B (peft_adapter_tensors)
    config = {"r": settings["rank"], "lora_alpha": settings["rank"], "target_modules": targets}
    return {f"{prefix}.{k}": v for k, v in config.items()}


def write_peft_adapter(model, arch: WanArch, out_dir: str | Path) -> Path:
    """`<out_dir>/pytorch_lora_weights.safetensors`, loadable by `pipe.load_lora_weights(out_dir)`, and the
    same tensors as `pytorch_lora_weights.bin`: diffusers' `load_lora_adapter(out_dir)` given only the folder
    reads that name (0.42); the scale is folded into lora_B, so the file needs no metadata."""
    out_dir = Path(out_dir)
    path, pickled = out_dir / ADAPTER_FILE, out_dir / ADAPTER_FILE_PICKLED
    for existing in (path, pickled):
        if existing.exists():
            raise FileExistsError(f"{existing} exists; refusing to overwrite it")
    tensors = peft_adapter_tensors(model, arch)
    meta = peft_metadata(model, tensors)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    ours = {"trained_rank": lora_meta(model)["rank"], "trained_alpha": lora_meta(model)["alpha"],
            "scale_folded_into_lora_B": lora_meta(model)["alpha"] / lora_meta(model)["rank"]}
    save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True),
                                           "megatron_regdpo": json.dumps(ours, sort_keys=True)})
    tmp_bin = pickled.with_name(pickled.name + ".partial")
    torch.save({k: v.contiguous() for k, v in tensors.items()}, tmp_bin)  # plain tensors: weights_only loads it
    tmp_bin.rename(pickled)
    tmp.rename(path)
    return path


def checkpoint_meta(model, arch: WanArch) -> dict:
    """model.json for a LoRA'd model's checkpoint: what load_lora_checkpoint needs to rebuild it."""
    dtype = next(model.parameters()).dtype
    return {"family": FAMILY, "arch": dataclasses.asdict(arch), "dtype": str(dtype), "lora": lora_meta(model)}

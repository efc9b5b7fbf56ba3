"""Wan2.1 architecture: the named sizes with their published dimensions.

An `WanArch` is plain data (no torch), so config validation and the dry run can read it cheaply.
The numbers are those of the diffusers configs of Wan-AI/Wan2.1-{T2V-1.3B,T2V-14B,I2V-14B-720P}.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_regdpo.checkpoint_io.hints import not_a_checkpoint
from megatron_regdpo.config.schema import ConfigError

CHECKPOINT_META = "model.json"  # checkpoint_io.megatron_ckpt.META_FILE (importing it would pull in torch)
CHECKPOINT_FAMILY = "wan2.1"    # models.wan.convert.FAMILY


@dataclass(frozen=True)
class WanArch:
    num_layers: int
    num_heads: int
    head_dim: int
    ffn_dim: int
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    image_dim: int | None = None          # set for I2V: CLIP image-embedding width (1280)
    image_tokens: int = 257               # CLIP ViT-H/14 tokens that precede the text in the I2V context
    patch: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def task(self) -> Literal["t2v", "i2v"]:
        return "i2v" if self.image_dim is not None else "t2v"

    def diffusers_config(self) -> dict:
        """The `WanTransformer3DModel` constructor arguments for this architecture."""
        return dict(
            patch_size=list(self.patch), num_attention_heads=self.num_heads,
            attention_head_dim=self.head_dim, in_channels=self.in_channels,
            out_channels=self.out_channels, text_dim=self.text_dim, freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim, num_layers=self.num_layers, cross_attn_norm=self.cross_attn_norm,
            qk_norm="rms_norm_across_heads", eps=self.eps, image_dim=self.image_dim,
            added_kv_proj_dim=self.hidden if self.image_dim is not None else None,
            rope_max_seq_len=self.rope_max_seq_len,
        )

    @classmethod
    def from_diffusers_config(cls, cfg: dict) -> "WanArch":
        """Inverse of `diffusers_config`; rejects Wan variants we do not implement and other models' configs."""
        kind = cfg.get("_class_name")
        missing = [k for k in ("num_attention_heads", "attention_head_dim", "num_layers", "ffn_dim") if k not in cfg]
        if kind not in (None, "WanTransformer3DModel") or missing:
            raise ValueError(f"not a Wan transformer config (_class_name={kind!r}"
                             + (f", missing {', '.join(missing)}" if missing else "")
                             + "): give the pipeline's transformer/ folder (its config.json names "
                               "WanTransformer3DModel), not the VAE's or the text encoder's")
        if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
            raise ValueError(f"unsupported qk_norm {cfg.get('qk_norm')!r} (need 'rms_norm_across_heads')")
        if cfg.get("pos_embed_seq_len") is not None:
            raise ValueError("pos_embed_seq_len (Wan FLF2V) is not supported")
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        added = cfg.get("added_kv_proj_dim")
        if (added is None) != (cfg.get("image_dim") is None) or (added not in (None, heads * head_dim)):
            raise ValueError(f"image_dim={cfg.get('image_dim')} with added_kv_proj_dim={added} "
                             f"is not a Wan2.1 layout (need both unset, or added_kv_proj_dim={heads * head_dim})")
        return cls(
            num_layers=cfg["num_layers"], num_heads=heads, head_dim=head_dim, ffn_dim=cfg["ffn_dim"],
            in_channels=cfg["in_channels"], out_channels=cfg.get("out_channels") or cfg["in_channels"],
            text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"], image_dim=cfg.get("image_dim"),
            patch=tuple(cfg["patch_size"]), eps=cfg["eps"], cross_attn_norm=cfg["cross_attn_norm"],
            rope_max_seq_len=cfg.get("rope_max_seq_len", 1024),
        )


SIZES: dict[str, WanArch] = {
    # small enough for CPU tests and the demo; same structure as the real thing
    "debug": WanArch(num_layers=2, num_heads=4, head_dim=16, ffn_dim=128, text_dim=32, freq_dim=32),
    "1.3B": WanArch(num_layers=30, num_heads=12, head_dim=128, ffn_dim=8960),
    "14B": WanArch(num_layers=40, num_heads=40, head_dim=128, ffn_dim=13824),
    "14B-i2v": WanArch(num_layers=40, num_heads=40, head_dim=128, ffn_dim=13824,
                       in_channels=36, image_dim=1280),
}

# ModelConfig fields that override the named size's value when not None.
_OVERRIDABLE = ("num_layers", "num_heads", "head_dim", "ffn_dim", "in_channels", "out_channels",
                "text_dim", "image_dim", "freq_dim")


def checkpoint_arch(ckpt_dir: str | Path) -> WanArch:
    """The architecture a checkpoint folder records in its model.json (written by every save)."""
    path = Path(ckpt_dir) / CHECKPOINT_META
    if not path.is_file():
        raise FileNotFoundError(not_a_checkpoint(ckpt_dir))
    meta = json.loads(path.read_text())
    if meta.get("family") != CHECKPOINT_FAMILY or not isinstance(meta.get("arch"), dict):
        raise ConfigError(f"{path}: family={meta.get('family')!r} with arch {meta.get('arch')!r} is not a "
                          f"{CHECKPOINT_FAMILY} checkpoint")
    fields = dict(meta["arch"])
    fields["patch"] = tuple(fields["patch"])
    return WanArch(**fields)


def arch_differences(want: WanArch, have: WanArch) -> list[tuple[str, object, object]]:
    """(field, want's value, have's value) for every WanArch field that differs."""
    return [(f.name, getattr(want, f.name), getattr(have, f.name)) for f in dataclasses.fields(WanArch)
            if getattr(want, f.name) != getattr(have, f.name)]


def resolve_arch(model_cfg, checkpoint: str | Path | None = None) -> WanArch:
    """The named size with the non-None overrides of a `ModelConfig` applied.

    `size: from_checkpoint` is exactly the architecture in `model.arch_from`/model.json (the loader sets it to
    checkpoint.load); an explicit field that disagrees with it is a ConfigError naming both values. With
    `checkpoint` given (the run's checkpoint.load), a named size must resolve to that checkpoint's architecture
    too: a shape-compatible mismatch (4 heads x 16 vs 2 x 32) would otherwise load and train silently."""
    source = getattr(model_cfg, "arch_from", None) if model_cfg.size == "from_checkpoint" else None
    if model_cfg.size == "from_checkpoint":
        if source is None and checkpoint is None:
            raise ConfigError("model.size=from_checkpoint needs checkpoint.load (or model.arch_from): the "
                              "checkpoint whose model.json gives the architecture")
        arch = checkpoint_arch(source or checkpoint)
    else:
        arch = SIZES[model_cfg.size]
    changes = {k: getattr(model_cfg, k) for k in _OVERRIDABLE if getattr(model_cfg, k, None) is not None}
    task = getattr(model_cfg, "task", None)
    if task == "t2v" and "image_dim" not in changes:
        changes["image_dim"] = None
    elif task == "i2v" and changes.get("image_dim", arch.image_dim) is None:
        changes["image_dim"] = 1280 if arch.hidden >= 1024 else 32  # debug-sized i2v gets a debug image width
        changes.setdefault("in_channels", 36)
    resolved = dataclasses.replace(arch, **changes)
    if model_cfg.size == "from_checkpoint" or checkpoint is not None:
        _same_as_checkpoint(model_cfg, resolved, source or checkpoint)
    return resolved


def _same_as_checkpoint(model_cfg, resolved: WanArch, ckpt_dir) -> None:
    have = checkpoint_arch(ckpt_dir)
    diffs = arch_differences(resolved, have)
    if not diffs:
        return
    meta = Path(ckpt_dir) / CHECKPOINT_META
    named = "" if model_cfg.size == "from_checkpoint" else f" (model.size={model_cfg.size!r})"
    raise ConfigError([f"model.{k}={w!r}{named} but {meta} has {k}={h!r}; set model.size=from_checkpoint to "
                       f"train the checkpoint's architecture" if named else
                       f"model.{k}={w!r} but {meta} has {k}={h!r}; drop model.{k} to train the checkpoint's "
                       f"architecture" for k, w, h in diffs])

"""Declarative name mapping: our Megatron Wan <-> diffusers `WanTransformer3DModel`.

Each rule maps one of our tensors to one or more diffusers tensors; `fuse="heads"` interleaves the
diffusers tensors per attention head along dim 0 (see checkpoint_io.engine). `{i}` is a block index.
"""
from __future__ import annotations

from megatron_regdpo.checkpoint_io.engine import Rule

from .arch import WanArch

WB = ("weight", "bias")

GLOBAL = [  # (ours, diffusers, param names)
    ("patch_embedding", "patch_embedding", WB),
    ("condition.time_embedder.linear_1", "condition_embedder.time_embedder.linear_1", WB),
    ("condition.time_embedder.linear_2", "condition_embedder.time_embedder.linear_2", WB),
    ("condition.time_proj", "condition_embedder.time_proj", WB),
    ("condition.text_embedder.linear_1", "condition_embedder.text_embedder.linear_1", WB),
    ("condition.text_embedder.linear_2", "condition_embedder.text_embedder.linear_2", WB),
    ("proj_out", "proj_out", WB),
    ("scale_shift_table", "scale_shift_table", ("",)),
]
IMAGE = [
    ("condition.image_embedder.norm1", "condition_embedder.image_embedder.norm1", WB),
    ("condition.image_embedder.fc1", "condition_embedder.image_embedder.ff.net.0.proj", WB),
    ("condition.image_embedder.fc2", "condition_embedder.image_embedder.ff.net.2", WB),
    ("condition.image_embedder.norm2", "condition_embedder.image_embedder.norm2", WB),
]
BLOCK = [  # (ours, diffusers sources, param names, fuse)
    ("scale_shift_table", ("scale_shift_table",), ("",), None),
    ("self_attention.linear_qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v"), WB, "heads"),
    ("self_attention.q_norm", ("attn1.norm_q",), ("weight",), None),
    ("self_attention.k_norm", ("attn1.norm_k",), ("weight",), None),
    ("self_attention.linear_proj", ("attn1.to_out.0",), WB, None),
    ("cross_attention.linear_q", ("attn2.to_q",), WB, None),
    ("cross_attention.linear_kv", ("attn2.to_k", "attn2.to_v"), WB, "heads"),
    ("cross_attention.q_norm", ("attn2.norm_q",), ("weight",), None),
    ("cross_attention.k_norm", ("attn2.norm_k",), ("weight",), None),
    ("cross_attention.linear_proj", ("attn2.to_out.0",), WB, None),
    ("mlp.linear_fc1", ("ffn.net.0.proj",), WB, None),
    ("mlp.linear_fc2", ("ffn.net.2",), WB, None),
]
BLOCK_NORM2 = [("norm2", ("norm2",), WB, None)]
BLOCK_IMAGE = [
    ("cross_attention.linear_kv_img", ("attn2.add_k_proj", "attn2.add_v_proj"), WB, "heads"),
    ("cross_attention.k_img_norm", ("attn2.norm_added_k",), ("weight",), None),
]
# diffusers lists norm_added_q as ignorable on load; Wan2.1 checkpoints do not carry it
IGNORED_DIFFUSERS_KEYS = ()


def _join(prefix: str, param: str) -> str:
    return f"{prefix}.{param}" if param else prefix


def wan_rules(arch: WanArch, layers: range | None = None) -> list[Rule]:
    """All rules for `arch`; `layers` restricts blocks (a pipeline stage), global indices."""
    rules: list[Rule] = []
    glob = GLOBAL + (IMAGE if arch.image_dim is not None else [])
    for ours, theirs, params in glob:
        rules += [Rule(_join(ours, p), (_join(theirs, p),)) for p in params]
    block = BLOCK + (BLOCK_NORM2 if arch.cross_attn_norm else []) + (BLOCK_IMAGE if arch.image_dim is not None else [])
    for i in layers if layers is not None else range(arch.num_layers):
        for ours, theirs, params, fuse in block:
            rules += [Rule(_join(f"decoder.layers.{i}.{ours}", p), tuple(_join(f"blocks.{i}.{t}", p) for t in theirs), fuse)
                      for p in params]
    return rules

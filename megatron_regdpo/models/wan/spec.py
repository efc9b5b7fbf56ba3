"""The one place that chooses layer implementations: `te` (Transformer Engine, FP8-capable) or `local`.

`local` runs anywhere (CPU included): Megatron-Core's own TP linears (with a leaner matmul underneath,
linear.py), torch SDPA, our norms.
`te` swaps the linears and core attention for Transformer Engine's; the Wan-specific norms (fp32
LayerNorm, across-heads RMSNorm) stay ours in both, since TE has no across-heads RMSNorm.
"""
from __future__ import annotations

import dataclasses

from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from .attention import (ContextParallelSDPAttention, SDPAttention, WanCrossAttention, WanCrossAttentionSubmodules, WanSelfAttention,
                        WanSelfAttentionSubmodules)
from .linear import LeanColumnParallelLinear, LeanRowParallelLinear
from .layer import WanLayer, WanLayerSubmodules, WanMLP
from .norms import AcrossHeadsRMSNorm, FP32LayerNorm


def _backend_modules(backend: str, cp_size: int = 1):
    """(column linear, row linear, self-attention core, cross-attention core) for a backend."""
    if backend == "local":
        return LeanColumnParallelLinear, LeanRowParallelLinear, \
            (ContextParallelSDPAttention if cp_size > 1 else SDPAttention), SDPAttention
    if backend == "te":
        try:
            from megatron.core.extensions.transformer_engine import (TEColumnParallelLinear, TEDotProductAttention,
                                                                     TERowParallelLinear)
            import transformer_engine  # noqa: F401
        except ImportError as e:
            raise ValueError(f"model.backend='te' needs Transformer Engine (pip install '.[gpu]'): {e}") from e
        # TE's attention runs context parallelism itself (config.cp_comm_type) for self-attention;
        # cross-attention reads the replicated context and must not
        return TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention, _te_cross_attention()
    raise ValueError(f"unknown model.backend {backend!r}; expected 'local' or 'te'")


def _te_cross_attention():
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class TECrossAttentionNoCP(TEDotProductAttention):
        """TE core attention for video queries x replicated context: context parallelism off."""

        def __init__(self, config, *args, **kwargs):
            super().__init__(dataclasses.replace(config, context_parallel_size=1), *args, **kwargs)

    return TECrossAttentionNoCP


def wan_layer_spec(backend: str, with_image: bool, image_tokens: int, cross_attn_norm: bool,
                   cp_size: int = 1, recompute_full: bool = False) -> ModuleSpec:
    column, row, core, cross_core = _backend_modules(backend, cp_size)
    return ModuleSpec(
        module=WanLayer,
        params={"cross_attn_norm": cross_attn_norm, "recompute_full": recompute_full},
        submodules=WanLayerSubmodules(
            self_attention=ModuleSpec(module=WanSelfAttention, submodules=WanSelfAttentionSubmodules(
                linear_qkv=column, core_attention=core, linear_proj=row, qk_norm=AcrossHeadsRMSNorm)),
            cross_attention=ModuleSpec(
                module=WanCrossAttention, params={"image_tokens": image_tokens},
                submodules=WanCrossAttentionSubmodules(
                    linear_q=column, linear_kv=column, core_attention=cross_core, linear_proj=row,
                    qk_norm=AcrossHeadsRMSNorm, with_image=with_image)),
            mlp=ModuleSpec(module=WanMLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            norm=FP32LayerNorm,
        ),
    )

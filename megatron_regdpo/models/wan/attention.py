"""Wan self- and cross-attention on Megatron-Core tensor-parallel linears.

Legend: S video tokens, T context tokens, B batch, D hidden, H heads on this rank, K head dim.
Layout is Megatron's sequence-first [S, B, ...]. The fused projections interleave per head
([q_h | k_h | v_h] for self-attention, [k_h | v_h] for cross-attention), so a contiguous split of
the output dimension over TP ranks hands each rank whole heads; checkpoint conversion builds that
layout from diffusers' separate to_q/to_k/to_v.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Union

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_regdpo.parallel.context import all_gather_seq

from .lean import ContiguousGrad, recomputed_in_backward
from .rope_norm import rms_output

SpecOrType = Union[ModuleSpec, type]


class SDPAttention(MegatronModule):
    """Core attention on torch SDPA with TEDotProductAttention's interface (sbhd in, [S, B, H*K] out).

    `forward` takes the mask arguments positionally and without defaults, as TE's does, so a caller that
    omits them fails here on CPU rather than at the first te forward on a GPU. SDPA takes q, k and v with
    any strides (a unit last one): they may stay views of the fused QKV output."""

    takes_views = True

    def __init__(self, config, layer_number: int, attn_mask_type=AttnMaskType.no_mask,
                 attention_type: str = "self", softmax_scale=None, pg_collection=None, **unused):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None,
                packed_seq_params=None):
        return self._attend(query, key, value, attention_mask)

    def _attend(self, query, key, value, attention_mask):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # -> [B, H, S, K]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).flatten(2)


class ContextParallelSDPAttention(SDPAttention):
    """SDPA over a context-parallel token chunk: keys and values are all-gathered over the CP group
    (backward reduce-scatters their gradients), so each rank's queries see the whole sequence."""

    def __init__(self, config, layer_number: int, pg_collection=None, **kwargs):
        super().__init__(config, layer_number, pg_collection=pg_collection, **kwargs)
        self.cp_group = pg_collection.cp

    def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None,
                packed_seq_params=None):
        key, value = all_gather_seq(key, self.cp_group), all_gather_seq(value, self.cp_group)
        return self._attend(query, key, value, attention_mask)


@dataclass
class WanSelfAttentionSubmodules:
    linear_qkv: SpecOrType
    core_attention: SpecOrType
    linear_proj: SpecOrType
    qk_norm: SpecOrType


@dataclass
class WanCrossAttentionSubmodules:
    linear_q: SpecOrType
    linear_kv: SpecOrType
    core_attention: SpecOrType
    linear_proj: SpecOrType
    qk_norm: SpecOrType
    with_image: bool = False  # I2V: extra K/V projections for the CLIP image tokens


class _WanAttentionBase(MegatronModule):
    def __init__(self, config, submodules, layer_number: int, pg_collection, attention_type: str):
        super().__init__(config=config)
        self.tp_group = pg_collection.tp
        self.recompute_core_attention = (config.recompute_granularity == "selective"
                                         and "core_attn" in (config.recompute_modules or []))
        tp = torch.distributed.get_world_size(self.tp_group)
        self.heads, self.head_dim = config.num_attention_heads // tp, config.kv_channels
        d = config.hidden_size
        self.q_norm = build_module(submodules.qk_norm, config, d, config.layernorm_epsilon, tp_group=self.tp_group)
        self.k_norm = build_module(submodules.qk_norm, config, d, config.layernorm_epsilon, tp_group=self.tp_group)
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number,
            attn_mask_type=AttnMaskType.no_mask, attention_type=attention_type, pg_collection=pg_collection,
            cp_comm_type=config.cp_comm_type)
        self._views = getattr(self.core_attention, "takes_views", False)   # TE's: contiguous q, k, v
        self.linear_proj = build_module(
            submodules.linear_proj, d, d, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="proj", tp_group=self.tp_group)

    def _attend(self, q, k, v, recipes=()):
        """Core attention; under selective recompute its activations are recomputed in backward
        (megatron-core's `recompute_granularity: selective`, modules ["core_attn"]). `recipes`: (tensor,
        recompute) pairs of q and k, which attention keeps for backward as their recomputes."""
        with recomputed_in_backward(*recipes):
            if self.recompute_core_attention and self.training and torch.is_grad_enabled():
                return tensor_parallel.checkpoint(self._core_attention, False, q, k, v)
            return self._core_attention(q, k, v)

    def _core_attention(self, q, k, v):
        # The one call into core attention, TE's or ours: a DiT attends without a mask, said explicitly
        # (TEDotProductAttention.forward has no default for attn_mask_type and reads its .name).
        return self.core_attention(q, k, v, None, AttnMaskType.no_mask)

    def _column(self, spec, in_size, out_size, config, name):
        return build_module(
            spec, in_size, out_size, config=config, init_method=config.init_method, gather_output=False,
            bias=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name=name, tp_group=self.tp_group)

    def _heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        return x.unflatten(-1, (self.heads, parts * self.head_dim)).split(self.head_dim, dim=-1)

    def _normed(self, norm, x_SBHK: torch.Tensor, rope=None):
        """The across-heads norm (then RoPE) of x, and the recipes that recompute it in backward from what
        the norm keeps anyway (none without a graph: they would only keep the norm's input alive). x may be
        a view of the fused projection's output: where core attention takes v as a view too, the norm
        keeps the fused output once (q, k and v), otherwise q and k are copied as v is."""
        if not self._views:
            x_SBHK = x_SBHK.contiguous()
        stats = []
        y = norm(x_SBHK, stats, rope)
        if not y.requires_grad:
            return y, ()
        return y, ((y, partial(rms_output, x_SBHK, stats[0], norm.weight, rope)),)

    def _value(self, v_SBHK):
        return v_SBHK if self._views else v_SBHK.contiguous()


class WanSelfAttention(_WanAttentionBase):
    def __init__(self, config, submodules: WanSelfAttentionSubmodules, layer_number: int = 1, pg_collection=None):
        super().__init__(config, submodules, layer_number, pg_collection, "self")
        self.linear_qkv = self._column(submodules.linear_qkv, config.hidden_size, 3 * config.hidden_size, config, "qkv")

    def forward(self, x_SBD: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.linear_qkv(x_SBD)
        q, k, v = self._heads(qkv, 3)
        q, q_recipe = self._normed(self.q_norm, q, rope)
        k, k_recipe = self._normed(self.k_norm, k, rope)
        out, _ = self.linear_proj(self._attend(q, k, self._value(v), q_recipe + k_recipe))
        return out


class WanCrossAttention(_WanAttentionBase):
    """Attention of video tokens to the text context (and, for I2V, separately to the image tokens)."""

    def __init__(self, config, submodules: WanCrossAttentionSubmodules, layer_number: int = 1,
                 pg_collection=None, image_tokens: int = 0):
        super().__init__(config, submodules, layer_number, pg_collection, "cross")
        d = config.hidden_size
        # The context is replicated on every TP rank, never split along its sequence, so its
        # projections must not all-gather it as sequence-parallel linears would.
        ctx_config = dataclasses.replace(config, sequence_parallel=False)
        self.linear_q = self._column(submodules.linear_q, d, d, config, "q")
        self.linear_kv = self._column(submodules.linear_kv, d, 2 * d, ctx_config, "kv")
        self.image_tokens = image_tokens if submodules.with_image else 0
        if submodules.with_image:
            self.linear_kv_img = self._column(submodules.linear_kv, d, 2 * d, ctx_config, "kv_img")
            self.k_img_norm = build_module(submodules.qk_norm, config, d, config.layernorm_epsilon, tp_group=self.tp_group)

    def forward(self, x_SBD: torch.Tensor, context_TBD: torch.Tensor) -> torch.Tensor:
        img_TBD, txt_TBD = context_TBD[: self.image_tokens], context_TBD[self.image_tokens:]
        q, _ = self.linear_q(x_SBD)
        q, q_recipe = self._normed(self.q_norm, ContiguousGrad.apply(q).unflatten(-1, (self.heads, self.head_dim)))
        kv, _ = self.linear_kv(txt_TBD)
        k, v = self._heads(kv, 2)
        k, _ = self._normed(self.k_norm, k)
        out = self._attend(q, k, self._value(v), q_recipe)
        if self.image_tokens:
            kv_img, _ = self.linear_kv_img(img_TBD)
            k_img, v_img = self._heads(kv_img, 2)
            k_img, _ = self._normed(self.k_img_norm, k_img)
            out = out + self._attend(q, k_img, self._value(v_img), q_recipe)
        out, _ = self.linear_proj(out)
        return out

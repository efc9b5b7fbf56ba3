"""One Wan2.1 DiT block as a Megatron-Core transformer layer (built and stacked by TransformerBlock).

Legend: S video tokens (this rank's slice), T context tokens, B batch, D hidden, F ffn hidden.

adaLN: the time embedding's 6-way projection (shift, scale, gate for self-attention; the same for the
FFN) plus this block's learned `scale_shift_table`. Modulation runs in fp32 and casts back, as Wan does;
lean.py keeps only model-dtype tensors of it for backward.

TransformerBlock calls every layer with a fixed keyword set (hidden_states, attention_mask, context,
context_mask, rotary_pos_emb, ...). A DiT has no attention mask, so the per-sample modulation travels in
the `attention_mask` slot; the RoPE table travels in `rotary_pos_emb` as cos + i sin (complex64).

Full recompute is the layer's own (`recompute_full`, set by the spec): it checkpoints its whole forward
with megatron-core's CheckpointFunction (TE's under FP8), keeping only its inputs, exactly what
megatron's block-level `recompute_granularity: full` (uniform, 1 layer) does. It is not left to the block
because the block's recompute changed across megatron-core versions: from 0.18
(megatron/core/recompute.py) it hands `context` only to TransformerLayer instances, and this layer is not
one, so cross-attention would get None.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import BaseTransformerLayer, get_transformer_layer_offset
from megatron.core.utils import get_pg_rank

from .gelu import gelu_and_recompute
from .lean import GatedResidual, modulated_norm, norm_only, normed, recomputed_in_backward


@dataclass
class WanLayerSubmodules:
    self_attention: ModuleSpec
    cross_attention: ModuleSpec
    mlp: ModuleSpec
    norm: type  # FP32LayerNorm-like: (config, hidden, eps, affine)


class WanLayer(MegatronModule, BaseTransformerLayer):
    def __init__(self, config, submodules: WanLayerSubmodules, layer_number: int = 1,
                 pg_collection=None, vp_stage=None, cross_attn_norm: bool = True, recompute_full: bool = False,
                 **unused):
        super().__init__(config=config)
        self.tp_group = pg_collection.tp
        self.recompute_full = recompute_full
        # global 1-based index: TransformerBlock derives checkpoint keys from it under PP
        self.layer_number = layer_number + get_transformer_layer_offset(config, vp_stage, get_pg_rank(pg_collection.pp))
        d, eps = config.hidden_size, config.layernorm_epsilon
        self.norm1 = submodules.norm(config, d, eps, affine=False)
        self.self_attention = build_module(submodules.self_attention, config=config,
                                           layer_number=self.layer_number, pg_collection=pg_collection)
        self.norm2 = submodules.norm(config, d, eps, affine=True) if cross_attn_norm else None
        self.cross_attention = build_module(submodules.cross_attention, config=config,
                                            layer_number=self.layer_number, pg_collection=pg_collection)
        self.norm3 = submodules.norm(config, d, eps, affine=False)
        self.mlp = build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size,
                                tp_group=self.tp_group)
        self.scale_shift_table = torch.nn.Parameter(torch.randn(1, 6, d, dtype=config.params_dtype) / d**0.5)
        # every rank sees only its tokens under sequence parallelism: reduce its grad over TP
        setattr(self.scale_shift_table, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states, attention_mask=None, context=None, rotary_pos_emb=None, **unused):
        if self.recompute_full and self.training and torch.is_grad_enabled():
            return self._checkpointed(hidden_states, attention_mask, context, rotary_pos_emb)
        return self._forward(hidden_states, attention_mask, context, rotary_pos_emb)

    def _checkpointed(self, *args):
        if self.config.fp8:  # TE's checkpoint keeps the FP8 scaling state consistent across the recompute
            from megatron.core.extensions.transformer_engine import te_checkpoint
            return te_checkpoint(self._forward, False, tensor_parallel.random.get_cuda_rng_tracker,
                                 self.tp_group, *args)
        return tensor_parallel.checkpoint(self._forward, False, *args)

    def _forward(self, hidden_states, attention_mask, context, rotary_pos_emb):
        x_SBD, modulation_B6D = hidden_states, attention_mask
        mod_6BD = (self.scale_shift_table.float() + modulation_B6D.float()).transpose(0, 1)
        shift, scale, gate, c_shift, c_scale, c_gate = mod_6BD.unbind(0)

        # fp32 modulation and gates as Wan computes them, keeping only bf16 tensors for backward (lean.py).
        # The cross-attention norm's output, which linear_q keeps for its weight gradient, is recomputed in
        # backward from the norm's input (which the norm keeps). The modulated norms' outputs are kept (one
        # D-wide tensor each): recomputing norm1's cost a LayerNorm, two passes and saved-tensor hooks over
        # all of self-attention, ~1% of the step on CPU. The block keeps 0.59x (fp32) / 0.44x (bf16) of
        # diffusers' bytes (tools/bench_model.py, docs/benchmarks.md)
        h = modulated_norm(self.norm1, x_SBD, shift, scale)
        x_SBD = GatedResidual.apply(x_SBD, self.self_attention(h, rotary_pos_emb), gate)

        if self.norm2 is not None:
            h = norm_only(self.norm2, x_SBD)
            x_SBD = x_SBD + _keeping_as(h, partial(normed, self.norm2, x_SBD), self.cross_attention, context)
        else:
            x_SBD = x_SBD + self.cross_attention(x_SBD, context)

        h = modulated_norm(self.norm3, x_SBD, c_shift, c_scale)
        x_SBD = GatedResidual.apply(x_SBD, self.mlp(h), c_gate)
        return x_SBD, context


def _keeping_as(h, redo, module, *args):
    """module(h, *args), with h kept for backward (by module's first linear) as redo(), recomputed."""
    with recomputed_in_backward((h, redo)):
        return module(h, *args)


class WanMLP(MegatronModule):
    """linear_fc1 -> tanh GELU -> linear_fc2, what megatron-core's MLP computes for Wan's config. Its own
    because of one saving: the GELU's output, which linear_fc2 keeps for its weight gradient (ffn-wide: the
    largest tensor of the block), is recomputed in backward from the GELU's input, which the GELU keeps
    (gelu.py: on CPU the recompute also hands the GELU's backward what it needs)."""

    def __init__(self, config, submodules, ffn_hidden_size: int, tp_group=None):
        super().__init__(config=config)
        d = config.hidden_size
        self.linear_fc1 = build_module(
            submodules.linear_fc1, d, ffn_hidden_size, config=config, init_method=config.init_method,
            gather_output=False, bias=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc1",
            tp_group=tp_group)
        self.linear_fc2 = build_module(
            submodules.linear_fc2, ffn_hidden_size, d, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc2",
            tp_group=tp_group)

    def forward(self, h_SBD: torch.Tensor) -> torch.Tensor:
        pre_SBF, _ = self.linear_fc1(h_SBD)
        act_SBF, recompute = gelu_and_recompute(pre_SBF)
        if not act_SBF.requires_grad:  # no graph: the GELU's input need not outlive it
            del pre_SBF, recompute
            return self.linear_fc2(act_SBF)[0]
        with recomputed_in_backward((act_SBF, recompute)):
            out_SBD, _ = self.linear_fc2(act_SBF)
        return out_SBD

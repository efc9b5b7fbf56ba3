"""Norms of the Wan block, written for Megatron's tensor/sequence parallel layout.

Legend: S tokens (this rank's slice under SP/CP), B batch, D hidden, H heads on this rank, K head dim.

Wan normalises q and k with an RMSNorm over all heads at once (width H_total*K), not per head. Under
tensor parallelism each rank holds H_total/tp heads, so the mean square must be summed over the TP
group before it is used; the norm's weight is split across ranks like the heads it scales.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from .lean import unit_weight
from .rope_norm import RMSNormAcrossHeads


class FP32LayerNorm(MegatronModule):
    """LayerNorm computed in fp32 that RETURNS fp32 (callers modulate in fp32, then cast, as Wan does).

    Affine parameters (Wan's cross-attention norm2) see only this rank's tokens under sequence
    parallelism, so they are tagged `sequence_parallel` for Megatron's grad all-reduce over TP.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, affine: bool = False):
        super().__init__(config=config)
        self.hidden_size, self.eps = hidden_size, eps
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            for p in (self.weight, self.bias):
                setattr(p, "sequence_parallel", config.sequence_parallel)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else unit_weight(self.hidden_size, x.device)
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), (self.hidden_size,), w, b, self.eps)


class AcrossHeadsRMSNorm(MegatronModule):
    """RMSNorm over the full width H_total*K of q or k, with this rank's heads as input.

    `hidden_size` is the FULL width; the weight holds this rank's slice (split on dim 0 like the heads).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, tp_group=None):
        super().__init__(config=config)
        self.tp_group = tp_group
        tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        if hidden_size % tp:
            raise ValueError(f"q/k norm width {hidden_size} not divisible by tensor parallel size {tp}")
        self.full_width, self.eps = hidden_size, eps
        self._sum_group = tp_group if tp > 1 else None   # None: nothing to all-reduce (no per-call check)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size // tp, dtype=config.params_dtype))
        setattr(self.weight, "tensor_model_parallel", tp > 1)
        setattr(self.weight, "partition_dim", 0)
        setattr(self.weight, "partition_stride", 1)

    def forward(self, x: torch.Tensor, stats: list | None = None, rope: torch.Tensor | None = None) -> torch.Tensor:
        """`stats`, a list, receives the inverse RMS; given `rope` (Rope3D's table), the output is rotated
        (see rope_norm.RMSNormAcrossHeads)."""
        return RMSNormAcrossHeads.apply(x, self.weight, self._sum_group, self.full_width, self.eps, stats, rope)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"weight": 0}, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=ensure_metadata_has_dp_cp_group(metadata)["dp_cp_group"],
        )

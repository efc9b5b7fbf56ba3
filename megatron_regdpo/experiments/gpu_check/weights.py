"""Random weights for timed runs of models built uninitialised.

The planner's step (capacity/simulate.py) and a checkpoint import build the Wan model with
`init_weights=False`: megatron-core's tensor-parallel linears are left as torch.empty (every other
parameter is set by its module). Timing on that memory would time zeros or garbage (a bf16 product runs
faster on zeros; NaN can appear), and megatron's CPU initialisation of 1.3B parameters takes tens of
seconds. So the linears are filled here, on the device, with megatron's default N(0, 0.02).
"""
from __future__ import annotations

import torch

TP_LINEARS = ("ColumnParallelLinear", "RowParallelLinear", "TEColumnParallelLinear", "TERowParallelLinear",
              "TELayerNormColumnParallelLinear")


@torch.no_grad()
def randomize_linears_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> int:
    """Fill every tensor-parallel linear's weight with N(0, std) in place; returns how many were filled."""
    gen = None
    filled = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if any(c.__name__ in TP_LINEARS for c in type(module).__mro__) and isinstance(weight, torch.Tensor):
            if gen is None:
                gen = torch.Generator(weight.device).manual_seed(seed)
            weight.normal_(0.0, std, generator=gen)
            filled += 1
    return filled

"""The Wan block's CPU-specific forms of a step, and the switch that turns them off.

Where torch's CPU kernel for a step is slow and another form gives the same values, the block uses that form
on CPU tensors:
- gelu.py: the tanh GELU as x * sigmoid(2u), its derivative formed from the recompute's sigmoid;
- lean.py (`unit_weight`): a LayerNorm without a weight is handed a unit weight (torch's faster path; bitwise
  the same output and statistics).
Elsewhere (CUDA) each step is torch's own kernel. `kernels_as_on_gpu` makes CPU tensors take the GPU's forms
too, so that a step's memory is the GPU's: the capacity planner, which simulates a GPU step, and its
validation on real CPU tensors (capacity/simulate.py) run in it.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch

_AS_ON_GPU = ContextVar("wan_kernels_as_on_gpu", default=False)


@contextmanager
def kernels_as_on_gpu():
    """Within: every step takes the form it takes on a GPU, CPU tensors included."""
    token = _AS_ON_GPU.set(True)
    try:
        yield
    finally:
        _AS_ON_GPU.reset(token)


def cpu_forms(device: torch.device) -> bool:
    """Whether a step on `device` takes its CPU form (a CPU device, outside `kernels_as_on_gpu`)."""
    return device.type == "cpu" and not _AS_ON_GPU.get()

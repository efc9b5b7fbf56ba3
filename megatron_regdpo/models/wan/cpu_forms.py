"""The Wan block's CPU-specific forms of a step, and the switch that turns them off.

Where torch's CPU kernel for a step is slow and another form gives the same values, the block uses that form
on CPU tensors:
- gelu.py: the tanh GELU as x * sigmoid(2u), its derivative formed from the recompute's sigmoid;
- lean.py (`unit_weight`): a LayerNorm without a weight is handed a unit weight (torch's faster path; bitwise
  the same output and statistics);
- lean.py, rope_norm.py, gelu.py: the modulated LayerNorm, the gated residual, the q/k RMSNorm + RoPE and
  that GELU, forward and backward, run as fused C++ kernels (kernels/wan_cpu, `fused_kernels`) where they
  are built: the Python code's values with its sums in another order. Where they are not, the Python code.
Elsewhere (CUDA) each step is torch's own kernel. `kernels_as_on_gpu` makes CPU tensors take the GPU's forms
too, so that a step's memory is the GPU's: the capacity planner, which simulates a GPU step, and its
validation on real CPU tensors (capacity/simulate.py) run in it.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch

from kernels import wan_cpu

_AS_ON_GPU = ContextVar("wan_kernels_as_on_gpu", default=False)
_NO_FUSED = ContextVar("wan_without_fused_kernels", default=False)


@contextmanager
def kernels_as_on_gpu():
    """Within: every step takes the form it takes on a GPU, CPU tensors included."""
    token = _AS_ON_GPU.set(True)
    try:
        yield
    finally:
        _AS_ON_GPU.reset(token)


@contextmanager
def without_fused_kernels():
    """Within: the steps that `fused_kernels` serves run their Python code (the kernels' reference)."""
    token = _NO_FUSED.set(True)
    try:
        yield
    finally:
        _NO_FUSED.reset(token)


def cpu_forms(device: torch.device) -> bool:
    """Whether a step on `device` takes its CPU form (a CPU device, outside `kernels_as_on_gpu`)."""
    return device.type == "cpu" and not _AS_ON_GPU.get()


def fused_kernels(x: torch.Tensor):
    """The fused CPU kernels (kernels/wan_cpu) for a step on x, or None: x not a plain CPU tensor, inside
    `kernels_as_on_gpu` or `without_fused_kernels`, or the kernels unavailable (wan_cpu.status() says why;
    built on first use)."""
    if type(x) is not torch.Tensor or x.device.type != "cpu" or _AS_ON_GPU.get() or _NO_FUSED.get():
        return None
    return wan_cpu.ops()

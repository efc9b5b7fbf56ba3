"""Wan's FFN activation, tanh-approximated GELU, with its output recomputed in backward (the FFN keeps only
the GELU's input), computed on CPU in the form the CPU does fastest.

Legend: F the FFN's width (any shape works; the FFN's is [S, B, F]).

    gelu_tanh(x) = 0.5 x (1 + tanh(u)),   u = sqrt(2/pi) (x + 0.044715 x^3)
                 = x * sigmoid(2u)                          (0.5 (1 + tanh(u)) = sigmoid(2u), exactly)
    d/dx         = s + x s (1 - s) * 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2),   s = sigmoid(2u)

The FFN keeps the GELU's input for the GELU's backward and recomputes the output, which linear_fc2 keeps
for its weight gradient (models/wan/layer.py, WanMLP). torch's CPU kernels for the tanh form cost ~1.1 ms
(forward) and ~1.2 ms (backward) per 655k fp32 elements on this project's CI CPU, where `sigmoid` costs
0.28 ms and a multiply 0.09 ms: the tanh is the expensive part, and the backward computes it twice more
(once to recompute the output, once inside `gelu_backward`). On CPU, therefore:
- forward and the recompute compute s = sigmoid(2u) and x * s in fp32 (a handful of passes, one sigmoid);
- the recompute leaves x and s (fp32) for the GELU's backward, which runs right after linear_fc2's (the
  next node of the graph) and forms the derivative from them without another sigmoid: one sigmoid in
  backward where torch's kernels compute two tanh. s (and x's fp32 copy, for bf16) lives only between
  the two backward nodes.
The recompute is bitwise the forward (the same function); both equal torch's tanh GELU to rounding
(tests/unit/test_gelu.py; the sigmoid form is the more accurate of the two for large negative x, where
1 + tanh(u) cancels). Where the fused CPU kernels are built (kernels/wan_cpu/gelu.cpp, cpu_forms.py
`fused_kernels`), the same formulas run as one C++ pass each way instead: the forward (and its recompute, the
same kernel) and a backward that forms s again from x, so nothing is handed over. Elsewhere (CUDA) torch's
fused kernels are one pass each, so there the activation is torch's own GELU and the recompute calls it again.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from .cpu_forms import cpu_forms, fused_kernels

_K2 = 2 * math.sqrt(2 / math.pi)   # sigmoid's argument is _K2 * (x + _A x^3)
_A = 0.044715
# |x| beyond this: s (1 - s) is exactly 0 in fp32; clamping x there keeps x^2 finite in the derivative
_X_FLAT = 30.0


def _sigmoid_of(x32: torch.Tensor) -> torch.Tensor:
    """s = sigmoid(2u), a fresh fp32 tensor."""
    s = torch.mul(x32, x32)
    torch.addcmul(x32, s, x32, value=_A, out=s)
    return s.mul_(_K2).sigmoid_()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh-approximated GELU of x, computed in fp32 and cast to x's dtype, as x * sigmoid(2u) (a value:
    no graph; gelu_and_recompute is the differentiable one)."""
    x32 = x.detach().float()
    return _sigmoid_of(x32).mul_(x32).to(x.dtype)


def _with_parts(x: torch.Tensor):
    """gelu_tanh(x) (bitwise: the same products) and the fp32 (x, s) its derivative is formed from."""
    x32 = x.detach().float()
    s = _sigmoid_of(x32)
    return torch.mul(x32, s).to(x.dtype), (x32, s)


def _input_grad(grad, x32, s):
    """grad * d gelu_tanh / dx, in fp32, from (x, s). s (1 - s) is formed before x multiplies it: exactly 0
    where s is 0 or 1, whatever x."""
    q = torch.clamp(x32, -_X_FLAT, _X_FLAT).square_().mul_(3 * _A * _K2).add_(_K2).mul_(s)
    torch.addcmul(q, q, s, value=-1, out=q)   # K2 (1 + 3 A x^2) s (1 - s)
    return q.mul_(x32).add_(s).mul_(grad)


class _TanhGelu(torch.autograd.Function):
    """gelu_tanh keeping x; backward takes (x, s) from `parts` if the output's recompute left them."""

    @staticmethod
    def forward(ctx, x, parts: list):
        ctx.save_for_backward(x)
        ctx.parts = parts
        return gelu_tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        parts = ctx.parts.pop() if ctx.parts else _with_parts(x)[1]
        return _input_grad(grad, *parts).to(x.dtype), None


class _FusedGelu(torch.autograd.Function):
    """gelu_tanh through the fused CPU kernels (kernels/wan_cpu/gelu.cpp: the same formulas, one pass each
    way), keeping x; backward forms the derivative from x alone."""

    @staticmethod
    def forward(ctx, x, kernels):
        ctx.save_for_backward(x)
        ctx.kernels = kernels
        return _fused_value(kernels, x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ctx.kernels.gelu_backward(grad.to(x.dtype).contiguous(), x.contiguous()), None


def _recompute(x, parts: list):
    act, kept = _with_parts(x)
    parts[:] = [kept]   # one slot: a second backward over a retained graph replaces it
    return act


def _fused_value(kernels, x):
    """The fused forward's value: what _FusedGelu returns and its recompute gives again (one kernel: bitwise)."""
    return kernels.gelu_forward(x.contiguous())


def gelu_and_recompute(pre: torch.Tensor):
    """(gelu_tanh(pre), a function recomputing it bitwise) for recomputed_in_backward (lean.py): the
    graph keeps `pre` only. On CPU the sigmoid form above (outside `kernels_as_on_gpu`, cpu_forms.py), as the
    fused kernel where it is built; elsewhere torch's GELU (and its backward)."""
    if not cpu_forms(pre.device):
        return F.gelu(pre, approximate="tanh"), partial(F.gelu, pre, approximate="tanh")
    kernels = fused_kernels(pre)
    if kernels is not None:
        return _FusedGelu.apply(pre, kernels), partial(_fused_value, kernels, pre)
    parts: list = []
    return _TanhGelu.apply(pre, parts), partial(_recompute, pre, parts)

"""Wan's fp32 elementwise steps, computed exactly as before but keeping only bf16 tensors for backward.

Legend: S tokens, B batch, D hidden (this rank's width W for the q/k norms), H heads, K head dim.

Wan computes its adaLN modulation, q/k RMSNorm, RoPE and residual gates in fp32 and casts back. Left to
autograd, each of those steps keeps an fp32 copy of its input for backward: 15 D-wide fp32 tensors per
block, 60 of the ~90 bytes per token per hidden unit that a block keeps. Here each step keeps what its
backward needs in the model's dtype (or nothing) and redoes the cheap fp32 arithmetic in backward:
- modulated_norm / norm_only: norm (+ scale, shift) under a local checkpoint that keeps its bf16 input;
- GatedResidual: x + branch * gate keeps branch and gate (x's gradient is the incoming one);
- Rope: a rotation keeps only the angle table (its backward rotates back);
- ContiguousGrad: not a saving; it keeps a strided gradient from reaching a frozen linear's backward;
- RMSNormAcrossHeads: keeps x and the [S, B, 1] inverse RMS; its backward all-reduces the same [S, B, 1]
  statistic over TP that autograd's graph did, so the communication is unchanged.
Forward values are bitwise those of the plain code; gradients equal to rounding (tests/unit/test_lean.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint


def _recomputed(fn, *args):
    """fn(*args), keeping only its inputs for backward (a local checkpoint; plain call without a graph)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def _modulate(norm, x, shift, scale):
    return (norm(x) * (1 + scale) + shift).type_as(x)


def _normed(norm, x):
    return norm(x).type_as(x)


def modulated_norm(norm, x_SBD, shift_BD, scale_BD):
    """(norm(x) * (1 + scale) + shift) in fp32, cast to x's dtype; backward recomputes the fp32 part."""
    return _recomputed(_modulate, norm, x_SBD, shift_BD, scale_BD)


def norm_only(norm, x_SBD):
    """norm(x) cast to x's dtype (the affine cross-attention norm), keeping x rather than its fp32 copy."""
    return _recomputed(_normed, norm, x_SBD)


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient. The cross-attention query's gradient comes
    back from attention in [B, H, S, K] order, i.e. strided in the [S, B, D] layout of linear_q's output;
    a frozen (LoRA base) linear's backward then multiplies it as `grad.matmul(weight)`, which torch cannot
    fold into one GEMM for a strided input: it expands the weight over the sequence into a batched matmul
    (on CPU the weight is materialised S times over)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class GatedResidual(torch.autograd.Function):
    """(x.float() + branch.float() * gate).type_as(x), keeping branch (model dtype) and gate [B, D]."""

    @staticmethod
    def forward(ctx, x, branch, gate):
        ctx.save_for_backward(branch, gate)
        ctx.x_dtype = x.dtype
        return (x.float() + branch.float() * gate).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        branch, gate = ctx.saved_tensors
        g32 = grad.float()
        d_branch = (g32 * gate).to(branch.dtype)
        d_gate = (g32 * branch.float()).sum_to_size(gate.shape).to(gate.dtype)
        return grad.to(ctx.x_dtype), d_branch, d_gate


class Rope(torch.autograd.Function):
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the angles of rope = stack(cos, sin) [2, S, 1, 1, K/2],
    in fp32, cast back; backward rotates the gradient back (keeps only the table)."""

    @staticmethod
    def _rotate(x, rope, sign: float):
        cos, sin = rope[0], sign * rope[1]
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)

    @staticmethod
    def forward(ctx, x_SBHK, rope):
        ctx.save_for_backward(rope)
        return Rope._rotate(x_SBHK, rope, 1.0)

    @staticmethod
    def backward(ctx, grad):
        (rope,) = ctx.saved_tensors
        return Rope._rotate(grad, rope, -1.0), None


class RMSNormAcrossHeads(torch.autograd.Function):
    """y = x * rsqrt(mean over the full width of x^2 + eps) * weight, in fp32, cast to x's dtype. The mean
    square sums this rank's width and all-reduces over `group` (TP): forward and backward each reduce one
    [..., 1] fp32 statistic, as autograd's graph of the plain code did."""

    @staticmethod
    def forward(ctx, x, weight, group, full_width: int, eps: float):
        x32 = x.float()
        sq = x32.pow(2).sum(-1, keepdim=True)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sq, group=group)
        rs = torch.rsqrt(sq / full_width + eps)
        ctx.save_for_backward(x, weight, rs)
        ctx.group, ctx.full_width = group, full_width
        return (x32 * rs * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rs = ctx.saved_tensors
        x32, g32 = x.float(), grad.float()
        x_hat = x32 * rs
        d_weight = (g32 * x_hat).sum_to_size(weight.shape).to(weight.dtype)
        d_x_hat = g32 * weight.float()
        d_sq = (d_x_hat * x32).sum(-1, keepdim=True) * (-0.5 * rs.pow(3)) / ctx.full_width
        if ctx.group is not None and dist.get_world_size(ctx.group) > 1:
            dist.all_reduce(d_sq, group=ctx.group)
        return (d_x_hat * rs + 2 * x32 * d_sq).to(x.dtype), d_weight, None, None, None

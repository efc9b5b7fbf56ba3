"""Wan's fp32 elementwise steps, computed exactly as before but keeping only bf16 tensors for backward.

Legend: S tokens, B batch, D hidden (this rank's width W for the q/k norms), H heads, K head dim.

Wan computes its adaLN modulation, q/k RMSNorm, RoPE and residual gates in fp32 and casts back. Left to
autograd, each of those steps keeps an fp32 copy of its input for backward: 15 D-wide fp32 tensors per
block, 60 of the ~90 bytes per token per hidden unit that a block keeps. Here each step keeps what its
backward needs in the model's dtype (or nothing) and redoes the cheap fp32 arithmetic in backward:
- modulated_norm / norm_only: norm (+ scale, shift) keeping only the bf16 input (its fp32 copy and the
  fp32 normed x are recomputed from it, see below);
- GatedResidual: x + branch * gate keeps branch and gate (x's gradient is the incoming one);
- Rope: a rotation keeps only the angle table (its backward rotates back);
- ContiguousGrad: not a saving; it keeps a strided gradient from reaching a frozen linear's backward;
- RMSNormAcrossHeads: keeps x and the [S, B, 1] inverse RMS; its backward all-reduces the same [S, B, 1]
  statistic over TP that autograd's graph did, so the communication is unchanged.
Forward values are bitwise those of the plain code; gradients equal to rounding (tests/unit/test_lean.py).

`recomputed_in_backward` goes one step further, for a tensor that a later op keeps (a linear keeps its input
for the weight gradient, attention keeps q and k) but that is a cheap function of tensors kept anyway: the
GELU's output (its input is kept by the GELU), a norm's output (the norm keeps its input), q/k after the
RMSNorm and RoPE (the norm keeps its input and inverse RMS). Backward recomputes it, bitwise, from those.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist


def modulate(norm, x, shift, scale):
    """modulated_norm's value (what a consumer's recipe recomputes in backward)."""
    return (norm(x) * (1 + scale) + shift).type_as(x)


def normed(norm, x):
    """norm_only's value (what a consumer's recipe recomputes in backward)."""
    return norm(x).type_as(x)


class _Recipe:
    """What autograd keeps instead of a view of a recomputed tensor: which one, and the view's geometry."""
    __slots__ = ("index", "size", "stride", "offset")

    def __init__(self, index: int, t: torch.Tensor):
        self.index, self.size, self.stride, self.offset = index, t.size(), t.stride(), t.storage_offset()


def _root(t: torch.Tensor) -> torch.Tensor | None:
    """The fresh tensor that t is, or views whole and in order (a reshape, a no-op cast); else None."""
    root = t if t._base is None else t._base
    whole = t.is_contiguous() and root.is_contiguous() and t.storage_offset() == 0 and t.numel() == root.numel()
    return root if whole else None


class _Enclosing:
    """A tensor packed by the hooks that enclose a recomputed_in_backward block."""
    __slots__ = ("packed",)

    def __init__(self, packed):
        self.packed = packed


def _enclosing_hooks():
    """The (pack, unpack) saved-tensor hooks in force, or None. torch (2.1 to 2.13 at least) keeps them on a
    stack where only the innermost pair runs; a block of ours hands every tensor it does not recompute to
    the pair it encloses, so that an enclosing block (or an offloader, or a memory count) still sees it."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


@contextmanager
def recomputed_in_backward(*recipes):
    """Within this block, autograd keeps each (target, redo) pair's target (or a view of it) for backward as
    redo(), recomputed once when backward first needs it. What redo reads must be kept for backward anyway,
    or this saves nothing: the block holds it until its saved tensors are released."""
    roots = [(_root(t), redo) for t, redo in recipes if t.requires_grad]
    # weak references: a strong one would keep the very bytes this is meant to free
    roots = [(weakref.ref(r), redo) for r, redo in roots if r is not None]
    if not (torch.is_grad_enabled() and roots):
        yield
        return
    outer = _enclosing_hooks()
    # a recomputed tensor lives from its first unpack to its last (views of it packed, not yet unpacked)
    recomputed: dict[int, torch.Tensor] = {}
    waiting = [0] * len(roots)

    def pack(t):
        for i, (ref, _) in enumerate(roots):
            base = ref()
            if base is not None and (t is base or t._base is base):
                waiting[i] += 1
                return _Recipe(i, t)
        return _Enclosing(outer[0](t)) if outer is not None else t

    def unpack(packed):
        if isinstance(packed, _Enclosing):
            return outer[1](packed.packed)
        if not isinstance(packed, _Recipe):
            return packed
        i = packed.index
        value = recomputed.get(i)
        if value is None:
            with torch.no_grad():
                value = roots[i][1]()
        waiting[i] -= 1
        if waiting[i] > 0:
            recomputed[i] = value
        else:
            recomputed.pop(i, None)
        return value.as_strided(packed.size, packed.stride, packed.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def modulated_norm(norm, x_SBD, shift_BD, scale_BD):
    """(norm(x) * (1 + scale) + shift) in fp32, cast to x's dtype; backward recomputes the fp32 part."""
    x32 = x_SBD.float()
    with recomputed_in_backward((x32, x_SBD.float)):          # the norm keeps its input: x's fp32 copy
        y32 = norm(x32)
    # the product keeps the normed x (for scale's grad); recomputed from x, not from x32 (which it would keep)
    with recomputed_in_backward((y32, partial(norm, x_SBD))):
        out = (y32 * (1 + scale_BD) + shift_BD).type_as(x_SBD)
    return _KeepForBackward.apply(out, x_SBD)


def norm_only(norm, x_SBD):
    """norm(x) cast to x's dtype (the affine cross-attention norm), keeping x rather than its fp32 copy."""
    x32 = x_SBD.float()
    with recomputed_in_backward((x32, x_SBD.float)):
        out = norm(x32).type_as(x_SBD)
    return _KeepForBackward.apply(out, x_SBD)


class _KeepForBackward(torch.autograd.Function):
    """Identity on `out` that keeps `x` for backward, where the recipes above recompute from it: x is kept
    (by their blocks) either way; this keeps it where autograd's saved tensors, and what counts them, see it."""

    @staticmethod
    def forward(ctx, out, x):
        ctx.save_for_backward(x)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


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
    [..., 1] fp32 statistic, as autograd's graph of the plain code did. A list given as `stats` receives
    the inverse RMS, with which `rms_scaled` recomputes y without communication."""

    @staticmethod
    def forward(ctx, x, weight, group, full_width: int, eps: float, stats: list | None = None):
        x32 = x.float()
        sq = x32.pow(2).sum(-1, keepdim=True)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sq, group=group)
        rs = torch.rsqrt(sq / full_width + eps)
        ctx.save_for_backward(x, weight, rs)
        ctx.group, ctx.full_width = group, full_width
        if stats is not None:
            stats.append(rs)
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
        return (d_x_hat * rs + 2 * x32 * d_sq).to(x.dtype), d_weight, None, None, None, None


def rms_scaled(x, rs, weight):
    """RMSNormAcrossHeads' output from its input and inverse RMS (bitwise what its forward returns)."""
    return (x.float() * rs * weight.float()).to(x.dtype)

"""The q/k RMSNorm across heads, then RoPE, as one autograd function that keeps model-dtype tensors (see
lean.py for the scheme), and the output's recompute.

Legend: S tokens, B batch, H heads on this rank, K head dim, W = H * K this rank's width.

RMSNormAcrossHeads keeps x (which may be a head's strided view of the fused QKV output: nothing copied), the
[S, B, 1, 1] inverse RMS and the RoPE table; `rms_output` recomputes its output bitwise from them for
attention's backward (lean.recomputed_in_backward). On CPU its forward, recompute and backward run as the
fused kernels of kernels/wan_cpu/rms_rope.cpp where they are built (cpu_forms.py `fused_kernels`); the code
below is their reference and fallback, and the path on GPU.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .cpu_forms import fused_kernels


def _rotated32(x, turn, own: bool = False):
    """x's interleaved pairs (x[2i], x[2i+1]) rotated by `turn` (complex, [..., K/2], broadcast over x's
    leading dims) as complex numbers, in fp32: one vectorised multiply, (x0 + i x1)(cos + i sin) = (x0 cos -
    x1 sin) + i(x0 sin + x1 cos), each product and sum rounded once (the same bits as the four real
    products on CPU; tests/unit/test_lean.py compares them). A real fp32 tensor that is no view of another
    (what recomputed_in_backward recognises): x's fp32 copy, or x itself where the caller `own`s it, rotated
    in place; else a fresh one."""
    x32 = x.float()
    if x32.stride(-1) != 1 or x32.storage_offset() % 2 or any(st % 2 for st in x32.stride()[:-1]):
        x32 = x32.contiguous()
    if x32 is not x or (own and x._base is None):
        torch.view_as_complex(x32.unflatten(-1, (-1, 2))).mul_(turn)
        return x32
    out = torch.empty(x32.shape, dtype=torch.float32, device=x32.device)
    torch.mul(torch.view_as_complex(x32.unflatten(-1, (-1, 2))), turn,
              out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
    return out


def rotate(x, turn, own: bool = False):
    """RoPE: x rotated by `turn` (Rope3D's table, cos + i sin) in fp32, cast to x's dtype; `own`: x is the
    caller's own fresh tensor, which may be overwritten."""
    return _rotated32(x, turn, own).to(x.dtype)


class RMSNormAcrossHeads(torch.autograd.Function):
    """y = x * rsqrt(mean over the full width of x^2 + eps) * weight, in fp32, cast to x's dtype; given a
    RoPE table `turn`, then rotate(y, turn). The width is x's trailing dimension(s) that `weight` spans:
    [..., W], or [..., H, K] with H*K = W, which may be a strided view (a head's slice of the fused QKV
    output: nothing is copied, the view is what is kept). The mean square sums this rank's width and
    all-reduces over `group` (TP): forward and backward each reduce one [..., 1] fp32 statistic, as
    autograd's graph of the plain code did. Keeps x, the weight, the inverse RMS and the table; backward
    rotates the gradient back (in fp32: no rounding between the rotation's backward and the norm's) and
    differentiates the norm. A list given as `stats` receives the inverse RMS, with which `rms_scaled`
    (and rotate) recompute the output without communication."""

    @staticmethod
    def forward(ctx, x, weight, group, full_width: int, eps: float, stats: list | None = None, turn=None):
        dims, w = _width(x, weight)
        k = _fused_heads(x, weight, turn)
        sq = k.rms_sumsq(x) if k is not None else x.float().pow(2).sum(dims, keepdim=True)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sq, group=group)
        rs = torch.rsqrt(sq / full_width + eps)
        ctx.save_for_backward(x, weight, rs, turn)
        ctx.group, ctx.full_width, ctx.dims = group, full_width, dims
        if stats is not None:
            stats.append(rs)
        return rms_output(x, rs, weight, turn)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rs, turn = ctx.saved_tensors
        k = _fused_heads(x, weight, turn)
        if k is not None and grad.dtype == x.dtype and grad.shape == x.shape and grad.stride(-1) == 1:
            w32, pairs = weight.float().reshape(-1), _pairs(turn)
            if ctx.group is not None and dist.get_world_size(ctx.group) > 1:   # the row's dot spans TP
                dot, d_w = k.rms_backward_dot(grad, x, rs, w32, pairs, ctx.needs_input_grad[1])
                dist.all_reduce(dot, group=ctx.group)
                d_x = k.rms_backward_dx(grad, x, rs, w32, pairs, dot, -1.0 / ctx.full_width)
            else:   # one pass over the rows
                d_x, d_w = k.rms_backward(grad, x, rs, w32, pairs, ctx.needs_input_grad[1], -1.0 / ctx.full_width)
            d_weight = d_w.view(weight.shape).to(weight.dtype) if ctx.needs_input_grad[1] else None
            return d_x, d_weight, None, None, None, None, None
        _, w = _width(x, weight)
        x32 = x.float()
        g32 = grad.float() if turn is None else _rotated32(grad, turn.conj())
        d_weight = None
        if ctx.needs_input_grad[1]:
            d_weight = (g32 * x32).mul_(rs).sum_to_size(w.shape).reshape(weight.shape).to(weight.dtype)
        d_x_hat = g32 * w.float() if g32 is grad else g32.mul_(w.float())   # never write into grad
        # d/dx of x * rs: d_x_hat * rs + x * d(rs)/d(sum x^2) * 2 * sum(d_x_hat * x), the sum over the full width
        dot = (d_x_hat * x32).sum(ctx.dims, keepdim=True)
        if ctx.group is not None and dist.get_world_size(ctx.group) > 1:
            dist.all_reduce(dot, group=ctx.group)
        d_x = d_x_hat.mul_(rs).addcmul_(x32, dot.mul_(rs.pow(3)).mul_(-1.0 / ctx.full_width))
        return d_x.to(x.dtype), d_weight, None, None, None, None, None


def _fused_heads(x, weight, turn):
    """The fused CPU kernels if they take the norm's x [S, B, H, K] (unit last stride; weight over H and K)
    and RoPE table [S, 1, 1, K/2], else None."""
    if x.dim() != 4 or x.stride(-1) != 1 or weight.numel() != x.shape[-2] * x.shape[-1]:
        return None
    if turn is not None and (turn.shape != (x.shape[0], 1, 1, x.shape[-1] // 2) or x.shape[-1] % 2):
        return None
    return fused_kernels(x)


def _pairs(turn):
    """Rope3D's complex table [S, 1, 1, K/2] as the kernels take it: (cos, sin) pairs, fp32 [S, K]."""
    return None if turn is None else torch.view_as_real(turn).reshape(turn.shape[0], -1)


def rms_output(x, rs, weight, turn=None):
    """RMSNormAcrossHeads' output (then RoPE, given `turn`) from its input and inverse RMS: what its forward
    returns and a recipe recomputes, bitwise."""
    k = _fused_heads(x, weight, turn)
    if k is not None:
        return k.rms_apply(x, rs, weight.float().reshape(-1), _pairs(turn))
    y = rms_scaled(x, rs, weight)
    return y if turn is None else rotate(y, turn, own=True)


def _width(x, weight):
    """(the dims of x that the norm's width spans, weight shaped to them)."""
    if x.shape[-1] == weight.numel():
        return (-1,), weight
    return (-2, -1), weight.view(x.shape[-2:])


def _scaled(x32, rs, w, dtype):
    """x * rs * w in fp32, cast to dtype: the norm's value, one expression for its forward and recompute."""
    return torch.mul(x32, rs).mul_(w.float()).to(dtype)


def rms_scaled(x, rs, weight):
    """RMSNormAcrossHeads' output from its input and inverse RMS (bitwise what its forward returns)."""
    return _scaled(x.float(), rs, _width(x, weight)[1], x.dtype)

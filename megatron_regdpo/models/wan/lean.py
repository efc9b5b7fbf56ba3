"""Wan's fp32 elementwise steps, computed as the plain code does but keeping only bf16 tensors for backward.

Legend: S tokens, B batch, D hidden (this rank's width W for the q/k norms), H heads, K head dim.

Wan computes its adaLN modulation, q/k RMSNorm, RoPE and residual gates in fp32 and casts back. Left to
autograd, each of those steps keeps an fp32 copy of its input for backward: 15 D-wide fp32 tensors per
block, 60 of the ~90 bytes per token per hidden unit that a block keeps. Here each step keeps what its
backward needs in the model's dtype (or nothing) and redoes the cheap fp32 arithmetic in backward:
- Fp32LayerNorm (modulated_norm: norm, scale, shift; norm_only: the affine norm): keeps the bf16 input
  and the norm's [S, B, 1] statistics; backward forms the fp32 normed x from them where it needs it;
- GatedResidual: x + branch * gate keeps branch and gate (x's gradient is the incoming one);
- ContiguousGrad: not a saving; it keeps a strided gradient from reaching a frozen linear's backward;
- RMSNormAcrossHeads (then RoPE, in the same function; rope_norm.py): keeps x, the [S, B, 1] inverse RMS
  and the angle table; its backward rotates back and all-reduces the same [S, B, 1] statistic over TP that
  autograd's graph did, so the communication is unchanged.
Forward values are bitwise those of the plain code, except RoPE (a complex multiply) and the RMSNorm of a
strided head view (its sum runs in another order): equal to rounding there; gradients equal to rounding
(tests/unit/test_lean.py). Each recompute below is bitwise its forward: the same function, the same inputs.

On CPU the steps above run as fused C++ kernels (kernels/wan_cpu, where they are built; cpu_forms.py
`fused_kernels`): the same values, one pass over the data each way, the sums (statistics, parameter gradients)
in another order, so to rounding of the code here, which stays their reference and fallback (and the path on
GPU). The fused forward and its recompute are the same kernel: bitwise equal.

`recomputed_in_backward` goes one step further, for a tensor that a later op keeps (a linear keeps its input
for the weight gradient, attention keeps q and k) but that is a cheap function of tensors kept anyway: the
GELU's output (its input is kept by the GELU), a norm's output (the norm keeps its input), q/k after the
RMSNorm and RoPE (the norm keeps its input and inverse RMS). Backward recomputes it, bitwise, from those.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch

from .cpu_forms import cpu_forms, fused_kernels


def normed(norm, x):
    """norm_only's value (what a consumer's recipe recomputes in backward): bitwise its forward's."""
    return _layer_norm(x, norm.eps, norm.weight, norm.bias, None, None)[0]


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
    """(norm(x) * (1 + scale) + shift) in fp32, cast to x's dtype, for a LayerNorm without affine
    parameters (Wan's norm1 and norm3); see Fp32LayerNorm."""
    if getattr(norm, "weight", None) is not None or getattr(norm, "bias", None) is not None:
        raise ValueError("modulated_norm takes a LayerNorm without affine parameters (Wan's norm1/norm3)")
    return Fp32LayerNorm.apply(x_SBD, norm.eps, None, None, shift_BD, scale_BD)


def norm_only(norm, x_SBD):
    """norm(x) in fp32 cast to x's dtype (the affine cross-attention norm); see Fp32LayerNorm."""
    return Fp32LayerNorm.apply(x_SBD, norm.eps, norm.weight, norm.bias, None, None)


def unit_weight(d: int, device: torch.device) -> torch.Tensor | None:
    """ones(d) in fp32 on a CPU device (cached), else None: what a LayerNorm without a weight is given.
    torch's CPU LayerNorm forward takes a slower path without a weight (2x the time at D = 256 on this
    project's CI CPU, 73 against 33 us for [640, 256] fp32, 2 threads); with a unit weight its output,
    mean and inverse std are bitwise the same (tests/unit/test_lean.py). Elsewhere, and under
    `kernels_as_on_gpu` (cpu_forms.py): None, torch's own path."""
    if not cpu_forms(device):
        return None
    w = _UNIT.get(d)
    if w is None:
        w = torch.ones(d, dtype=torch.float32)
        if type(w) is torch.Tensor:   # never cache a fake one (the planner's fake steps run as on GPU anyway)
            _UNIT[d] = w
    return w


_UNIT: dict[int, torch.Tensor] = {}


def _per_sample(t, x) -> bool:
    """t (a shift, scale or gate) is what the fused kernels take for x [S, B, D]: fp32 [B, D], unit last stride."""
    return t.dtype == torch.float32 and t.shape == x.shape[1:] and t.stride(-1) == 1


def _fused_rows(x, *per_sample):
    """The fused CPU kernels if they take x [S, B, D] and its per-sample tensors (None: no such tensor)."""
    if x.dim() != 3 or not all(t is None or _per_sample(t, x) for t in per_sample):
        return None
    return fused_kernels(x)


def _layer_norm(x, eps, weight, bias, shift, scale):
    """Fp32LayerNorm's forward values: (y in x's dtype, mean, rstd), the statistics [S, B, 1] fp32."""
    w32, b32 = (t.float() if t is not None else None for t in (weight, bias))
    k = _fused_rows(x, shift, scale)
    if k is not None:
        return k.layer_norm_forward(x.contiguous(), eps, w32, b32, shift, scale)
    x32 = x.float()
    if w32 is None:
        w32 = unit_weight(x32.shape[-1], x32.device)
    y32, mean, rstd = torch.native_layer_norm(x32, (x32.shape[-1],), w32, b32, eps)
    if scale is not None:
        y32 = y32 * (1 + scale) + shift
    return y32.to(x.dtype), mean, rstd


class Fp32LayerNorm(torch.autograd.Function):
    """y = layer_norm(x.float(), weight, bias), then, given them, y * (1 + scale) + shift (modulated norms
    have no weight or bias); cast to x's dtype. Keeps x (model dtype), the parameters and the [S, B, 1]
    mean and inverse std: backward forms the normalised x once from them where scale needs it and hands
    the rest to torch's own LayerNorm backward. The affine norm's forward is bitwise `normed` (the
    same kernel), which its consumer's recipe recomputes (models/wan/layer.py)."""

    @staticmethod
    def forward(ctx, x_SBD, eps: float, weight, bias, shift_BD, scale_BD):
        y, mean, rstd = _layer_norm(x_SBD, eps, weight, bias, shift_BD, scale_BD)
        ctx.save_for_backward(x_SBD, weight, bias, scale_BD, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, scale, mean, rstd = ctx.saved_tensors
        k = _fused_rows(x, scale)
        if k is not None and grad.dtype == x.dtype:
            w32 = weight.float() if weight is not None else None
            d_x, d_gamma, d_beta = k.layer_norm_backward(grad.contiguous(), x.contiguous(), mean, rstd, w32, scale,
                                                         ctx.needs_input_grad[0])
            d_x = d_x if ctx.needs_input_grad[0] else None
            if scale is not None:
                return d_x, None, None, None, d_beta.to(scale.dtype), d_gamma.to(scale.dtype)
            d_w, d_b = (d.view(t.shape).to(t.dtype) if t is not None else None
                        for d, t in ((d_gamma, weight), (d_beta, bias)))
            return d_x, None, d_w, d_b, None, None
        x32, g32 = x.float(), grad.float()
        d_shift = d_scale = None
        if scale is not None:   # no weight or bias here (modulated_norm)
            if ctx.needs_input_grad[4]:
                d_shift = g32.sum_to_size(scale.shape).to(scale.dtype)
            if ctx.needs_input_grad[5]:   # the normalised x, formed in place: one fresh tensor
                d_scale = (x32 - mean).mul_(rstd).mul_(g32).sum_to_size(scale.shape).to(scale.dtype)
            g32 = g32 * (1 + scale.float())
        want = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        d_x, d_w, d_b = torch.ops.aten.native_layer_norm_backward(
            g32, x32, (x32.shape[-1],), mean, rstd, weight.float() if weight is not None else None,
            bias.float() if bias is not None else None, want)
        d_x, d_w, d_b = (d.to(t.dtype) if d is not None else None for d, t in ((d_x, x), (d_w, weight), (d_b, bias)))
        return d_x, None, d_w, d_b, d_shift, d_scale


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
        k = _fused_rows(x, gate)
        if k is not None and branch.dtype == x.dtype and branch.shape == x.shape:
            return k.gated_residual(x.contiguous(), branch.contiguous(), gate)
        return (x.float() + branch.float() * gate).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        branch, gate = ctx.saved_tensors
        k = _fused_rows(branch, gate)
        if k is not None and grad.dtype == branch.dtype:
            d_branch, d_gate = k.gated_residual_backward(grad.contiguous(), branch.contiguous(), gate,
                                                         ctx.needs_input_grad[2])
            return grad.to(ctx.x_dtype), d_branch, d_gate.to(gate.dtype) if ctx.needs_input_grad[2] else None
        g32 = grad.float()
        d_branch = (g32 * gate).to(branch.dtype)
        d_gate = (g32 * branch.float()).sum_to_size(gate.shape).to(gate.dtype)
        return grad.to(ctx.x_dtype), d_branch, d_gate

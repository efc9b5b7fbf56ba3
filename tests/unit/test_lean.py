"""models/wan/lean.py and rope_norm.py: Wan's fp32 elementwise steps give the plain code's values (bitwise; RoPE to rounding) and gradients,
while keeping no fp32 copy of a token-sized tensor for backward. With the fused CPU kernels (kernels/wan_cpu) the
values are the plain code's to rounding (their sums run in another order), the gated residual's bitwise."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_regdpo.models.wan.cpu_forms import without_fused_kernels
from megatron_regdpo.models.wan.lean import GatedResidual, modulated_norm, norm_only
from megatron_regdpo.models.wan.rope_norm import RMSNormAcrossHeads, rotate

S, B, H, K = 6, 2, 4, 8
D = H * K


def _plain_rope(x, rope):
    cos, sin = rope[0], rope[1]
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def _plain_rms(x, w, eps=1e-6):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) / x.shape[-1] + eps) * w.float()).to(x.dtype)


class _Norm(torch.nn.Module):
    def __init__(self, affine: bool):
        super().__init__()
        self.eps = 1e-6
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(D)) if affine else None
        self.bias = torch.nn.Parameter(0.1 * torch.randn(D)) if affine else None

    def forward(self, x):
        return F.layer_norm(x.float(), (D,), self.weight, self.bias, self.eps)


def _check(plain, lean, inputs, dtype, bitwise=True):
    """Same forward bits (or, not `bitwise`, values equal to rounding); gradients of every input equal to rounding."""
    a = [t.detach().to(dtype if t.is_floating_point() and t.dim() > 2 else t.dtype).requires_grad_(t.requires_grad)
         for t in inputs]
    b = [t.detach().clone().requires_grad_(t.requires_grad) for t in a]
    out_a, out_b = plain(*a), lean(*b)
    assert out_b.dtype == out_a.dtype
    if bitwise:
        assert torch.equal(out_a, out_b)
    else:   # one rounding of each product and sum, in whatever order the complex multiply takes
        torch.testing.assert_close(out_b, out_a, rtol=0, atol=4 * torch.finfo(dtype).eps * out_a.abs().max().item())
    g = torch.randn_like(out_a)
    out_a.backward(g)
    out_b.backward(g)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for ta, tb in zip(a, b):
        if ta.requires_grad:
            torch.testing.assert_close(tb.grad, ta.grad, **tol)


@pytest.fixture(params=["python", "fused"])
def exact(request):
    """True: the Python code (bitwise the plain code); False: the fused CPU kernels (to rounding)."""
    if request.param == "fused":
        request.getfixturevalue("fused_cpu_kernels")
        yield False
        return
    with without_fused_kernels():
        yield True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_match_the_plain_code(dtype, exact):
    x, branch = torch.randn(S, B, D, requires_grad=True), torch.randn(S, B, D, requires_grad=True)
    shift, scale, gate = (0.1 * torch.randn(B, D).requires_grad_() for _ in range(3))
    _check(lambda x, b, g: (x.float() + b.float() * g).type_as(x), GatedResidual.apply, [x, branch, gate], dtype)
    angles = torch.randn(S, 1, 1, K // 2)
    rope, turn = torch.stack((angles.cos(), angles.sin())), torch.complex(angles.cos(), angles.sin())
    q = torch.randn(S, B, H, K, requires_grad=True)
    torch.testing.assert_close(rotate(q.detach(), turn), _plain_rope(q.detach(), rope), rtol=0, atol=1e-6)
    # the rotation by the conjugate undoes it (what the backward applies to the gradient)
    torch.testing.assert_close(rotate(rotate(q.detach(), turn), turn.conj()), q.detach(), rtol=1e-6, atol=1e-6)
    w = (1 + 0.1 * torch.randn(D)).requires_grad_()
    _check(_plain_rms, lambda x, w: RMSNormAcrossHeads.apply(x, w, None, D, 1e-6), [x, w], dtype, exact)
    # the norm of heads, then RoPE, in one function: the norm's value bitwise, the rotation to rounding
    _check(lambda q, w: _plain_rope(_plain_rms(q.flatten(-2), w).unflatten(-1, (H, K)), rope),
           lambda q, w: RMSNormAcrossHeads.apply(q, w, None, D, 1e-6, None, turn), [q, w], dtype, bitwise=False)
    # a head's slice of a fused projection, as [S, B, H, K] strided view: no copy, the same norm over H*K
    fused = torch.randn(S, B, H, 3 * K, requires_grad=True)
    _check(lambda f, w: _plain_rms(f[..., :K].flatten(-2), w).unflatten(-1, (H, K)),
           lambda f, w: RMSNormAcrossHeads.apply(f[..., :K], w, None, D, 1e-6), [fused, w], dtype, bitwise=False)
    norm = _Norm(affine=False)
    _check(lambda x, s, c: (norm(x) * (1 + c) + s).type_as(x), lambda x, s, c: modulated_norm(norm, x, s, c),
           [x, shift, scale], dtype, exact)
    affine = _Norm(affine=True)
    plain = affine.weight.grad
    _check(lambda x: affine(x).type_as(x), lambda x: norm_only(affine, x), [x], dtype, exact)
    assert affine.weight.grad is not None and plain is None   # the checkpointed norm's parameters get gradients


def test_no_fp32_token_sized_tensor_is_kept_for_backward(exact):
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    x = torch.randn(S, B, D, dtype=torch.bfloat16, requires_grad=True)
    shift, scale, gate = (0.1 * torch.randn(B, D) for _ in range(3))
    angles = torch.randn(S, 1, 1, K // 2)
    turn = torch.complex(angles.cos(), angles.sin())
    w = torch.ones(D, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = modulated_norm(_Norm(affine=False), x, shift, scale)
        q = RMSNormAcrossHeads.apply(h.unflatten(-1, (H, K)), w, None, D, 1e-6, None, turn)
        out = GatedResidual.apply(x, q.flatten(-2), gate)
    out.float().sum().backward()
    token_sized = [(dt, n) for dt, n in saved if n >= S * B * D]
    assert token_sized and all(dt == torch.bfloat16 for dt, _ in token_sized), token_sized


@pytest.mark.parametrize("threads", [1, 2])
def test_unit_weight_layer_norm_is_bitwise_torchs_without_a_weight(threads):
    """The unit weight that lean.py hands torch's CPU LayerNorm (its faster path) changes no bit of the output,
    the mean or the inverse std, over widths, row counts and magnitudes."""
    from megatron_regdpo.models.wan.lean import unit_weight

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for shape in [(320, 2, 256), (7, 3, 64), (33, 1, 1536), (5, 13), (2, 8, 96)]:
            for scale in (1.0, 1e3, 1e-3, 1e-8):
                x = torch.randn(shape, generator=g) * scale + 3 * scale
                d = shape[-1]
                w = unit_weight(d, x.device)
                assert w is not None and w.dtype == torch.float32 and not w.requires_grad
                assert unit_weight(d, x.device) is w   # cached
                plain = torch.native_layer_norm(x, (d,), None, None, 1e-6)
                unit = torch.native_layer_norm(x, (d,), w, None, 1e-6)
                for a, b in zip(plain, unit):
                    assert torch.equal(a, b), (shape, scale)
    finally:
        torch.set_num_threads(before)
    assert unit_weight(8, torch.device("meta")) is None   # not CPU: torch's own path, nothing substituted
    from megatron_regdpo.models.wan.cpu_forms import kernels_as_on_gpu
    with kernels_as_on_gpu():   # the planner's simulated GPU step: torch's own path on CPU too
        assert unit_weight(8, torch.device("cpu")) is None

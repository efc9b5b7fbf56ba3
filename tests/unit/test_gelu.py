"""models/wan/gelu.py: the FFN's tanh GELU equals torch's to rounding, values and gradients; its recompute is
bitwise its forward; the gradient is the same whether or not the recompute left its parts; no NaN where
torch's has none. Each on both CPU paths: the Python code and the fused kernel (kernels/wan_cpu/gelu.cpp)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_regdpo.models.wan.cpu_forms import kernels_as_on_gpu, without_fused_kernels
from megatron_regdpo.models.wan.gelu import gelu_and_recompute, gelu_tanh
from megatron_regdpo.models.wan.lean import recomputed_in_backward

ULP = {torch.float32: torch.finfo(torch.float32).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps}


@pytest.fixture(params=["python", "fused"])
def path(request):
    if request.param == "fused":
        request.getfixturevalue("fused_cpu_kernels")
        yield request.param
        return
    with without_fused_kernels():
        yield request.param


def _value(x):
    """The GELU's value on the path in force (what training computes)."""
    with torch.no_grad():
        return gelu_and_recompute(x)[0]


def _inputs(dtype):
    x = torch.cat([torch.randn(4000) * 3, torch.linspace(-12, 12, 2001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    return x.to(dtype)


def _exact(x):
    """gelu_tanh in float64 as x * sigmoid(2u): the tanh form cancels (1 + tanh(u) = 0) below x = -7 even there."""
    x = x.double()
    return x * torch.sigmoid(2 * (2 / math.pi) ** 0.5 * (x + 0.044715 * x**3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_equal_torch_tanh_gelu_to_rounding(dtype, path):
    x = _inputs(dtype)
    exact, ours, torchs = _exact(x), _value(x).double(), F.gelu(x, approximate="tanh").double()
    # relative to the exact value: a few roundings of the output dtype, where the sigmoid's argument z is
    # small; sigmoid(z) ~ exp(z) for z << 0 turns z's own rounding into a relative error |z| eps (fp32
    # arithmetic inside; below 1e-30 fp32's sigmoid underflows, as any fp32 kernel's would)
    x64 = x.double()
    z = 2 * (2 / math.pi) ** 0.5 * (x64 + 0.044715 * x64**3)
    rel = (ours - exact).abs() / exact.abs().clamp_min(1e-30)
    bound = 4 * ULP[dtype] + 4 * ULP[torch.float32] * z.abs()
    assert (rel <= bound).all(), x[(rel / bound).argmax()]
    # torch's kernel: the same values up to its own error, |x| eps where 1 + tanh(u) cancels
    assert ((ours - torchs).abs() <= 4 * ULP[dtype] * torchs.abs() + 2 * ULP[dtype] * x64.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recomputed", [True, False], ids=["parts_from_recompute", "parts_recomputed"])
def test_gradient_equals_torch_to_rounding(dtype, recomputed, path):
    x = _inputs(dtype).reshape(-1, 1).repeat(1, 3).requires_grad_()
    w = torch.randn(3, 5, dtype=dtype)
    g = torch.randn(x.shape[0], 5, dtype=dtype)

    act, redo = gelu_and_recompute(x)
    if recomputed:   # as in WanMLP: the next op keeps the output, recomputed in backward
        with recomputed_in_backward((act, redo)):
            out = act @ w
    else:
        out = act @ w
    out.backward(g)

    exact = torch.func.grad(lambda t: _exact(t).sum())   # d/dx of the float64 sigmoid form, elementwise
    x64 = x.detach().double()
    want = (exact(x64[:, 0])[:, None] * (g.double() @ w.double().t()))
    x_torch = x.detach().clone().requires_grad_()
    (F.gelu(x_torch, approximate="tanh") @ w).backward(g)
    ours_err = (x.grad.double() - want).abs().max() / want.abs().max()
    torch_err = (x_torch.grad.double() - want).abs().max() / want.abs().max()
    # as close to the exact gradient as torch's own kernel is, up to a few roundings
    assert ours_err <= torch_err + 8 * ULP[dtype], (ours_err, torch_err)


def test_recompute_is_bitwise_the_forward(path):
    for dtype in (torch.float32, torch.bfloat16):
        x = _inputs(dtype).requires_grad_()
        act, redo = gelu_and_recompute(x)
        again = redo()
        assert torch.equal(again, act) and again.data_ptr() != act.data_ptr()


def test_the_python_recompute_hands_its_parts_over():
    x = _inputs(torch.float32).requires_grad_()
    with without_fused_kernels():
        act, redo = gelu_and_recompute(x)
    redo()
    parts = redo.args[1]
    assert len(parts) == 1   # what the GELU's backward takes...
    act.backward(torch.ones_like(act))
    assert parts == []       # ...and releases


def test_the_two_backward_paths_agree_bitwise():
    grads, x0 = [], _inputs(torch.float32)
    for with_recompute in (True, False):
        x = x0.clone().requires_grad_()
        with without_fused_kernels():
            act, redo = gelu_and_recompute(x)
        if with_recompute:
            redo()
        act.backward(torch.linspace(-1, 1, act.numel()))
        grads.append(x.grad)
    assert torch.equal(*grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extremes_stay_finite_where_torch_does(dtype, path):
    big = torch.tensor([3e38, -3e38, 1e20, -1e20, 1e36, -1e36, 40.0, -40.0, 7.0, -11.0]).to(dtype).requires_grad_()
    act, redo = gelu_and_recompute(big)
    redo()
    act.backward(torch.ones_like(act))
    ref = big.detach().clone().requires_grad_()
    F.gelu(ref, approximate="tanh").backward(torch.ones_like(ref))
    finite = torch.isfinite(ref.grad)
    assert torch.isfinite(big.grad[finite]).all()
    torch.testing.assert_close(big.grad[finite], ref.grad[finite], rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.equal(act[act.abs() > 1e3], F.gelu(big.detach(), approximate="tanh")[act.abs() > 1e3])


def test_no_graph_keeps_nothing(path):
    x = _inputs(torch.float32)
    with torch.no_grad():
        act, _ = gelu_and_recompute(x.requires_grad_())
    assert not act.requires_grad and torch.equal(act, gelu_and_recompute(x)[0].detach())
    if path == "python":
        assert torch.equal(act, gelu_tanh(x))


def test_as_on_gpu_runs_torchs_kernels_on_cpu():
    """The capacity planner's steps (and their validation on real CPU tensors) take the GPU's kernels."""
    x = _inputs(torch.float32).requires_grad_()
    with kernels_as_on_gpu():
        act, redo = gelu_and_recompute(x)
    assert torch.equal(act, F.gelu(x.detach(), approximate="tanh")) and torch.equal(redo(), act)
    assert act.grad_fn.name() == "GeluBackward0"
    assert gelu_and_recompute(x)[0].grad_fn.name() != "GeluBackward0"   # and only within

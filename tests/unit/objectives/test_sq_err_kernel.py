"""kernels.sq_err on CPU: the autograd function against its torch reference, dispatch and the probe.

The Triton kernels themselves are checked under the interpreter in test_sq_err_kernel_interp.py (a
subprocess) and on a GPU in test_sq_err_kernel_gpu (marked, skipped here).
"""
from __future__ import annotations

import pytest
import torch

from kernels.capability import DISABLE_ENV, interpreter_on, triton_status, triton_usable
from kernels.sq_err import per_sample_sq_err_sum, sq_err_sum_backward_reference, sq_err_sum_reference

SHAPES = [(1, 7), (2, 3, 5), (3, 1025), (4, 2, 3, 4, 5)]


def _pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    target = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    return pred, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_function_matches_reference_values_and_grads(shape, dtype):
    pred, target = _pair(shape, dtype)
    out = per_sample_sq_err_sum(pred, target)
    assert out.shape == (shape[0],) and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = (pred.double() - target.double()).square().reshape(shape[0], -1).sum(1)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    g_N = torch.randn(shape[0], dtype=out.dtype)
    grad_pred, grad_target = torch.autograd.grad(out, (pred, target), g_N)
    assert grad_pred.dtype == dtype
    ref = 2 * (pred.double() - target.double()) * g_N.double().view(-1, *([1] * (len(shape) - 1)))
    tol = dict(rtol=2**-7, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)  # bf16: 1 ulp
    torch.testing.assert_close(grad_pred.double(), ref.detach(), **tol)
    torch.testing.assert_close(grad_target, -grad_pred)
    torch.testing.assert_close(sq_err_sum_reference(pred, target), out)
    torch.testing.assert_close(sq_err_sum_backward_reference(pred, target, g_N), grad_pred)


def test_gradcheck_float64():
    pred, target = _pair((3, 4, 5), torch.float64)
    assert torch.autograd.gradcheck(lambda p, t: per_sample_sq_err_sum(p, t, backend="torch"), (pred, target))


def test_grad_only_where_required():
    pred, _ = _pair((2, 9), torch.float32)
    target = torch.randn(2, 9)
    per_sample_sq_err_sum(pred, target).sum().backward()
    assert pred.grad is not None and target.grad is None


def test_cpu_dispatch_uses_torch_and_probe_says_why(monkeypatch):
    if interpreter_on():
        pytest.skip("TRITON_INTERPRET is set in this process")
    ok, why = triton_status("cpu")
    assert not ok and "GPUs only" in why
    pred, target = _pair((2, 5), torch.float32)
    with pytest.raises(ValueError, match="GPUs only"):
        per_sample_sq_err_sum(pred, target, backend="triton")
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert triton_status("cuda") == (False, f"disabled by {DISABLE_ENV}")
    assert not triton_usable()


def test_user_errors():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="'cuda'"):
        per_sample_sq_err_sum(x, x, backend="cuda")
    with pytest.raises(ValueError, match=r"\(2, 3\) vs \(3, 2\)"):
        per_sample_sq_err_sum(x, x.T)
    with pytest.raises(ValueError, match=r"\(6,\)"):
        per_sample_sq_err_sum(x.flatten(), x.flatten())
    with pytest.raises(ValueError, match="bfloat16"):
        per_sample_sq_err_sum(x, x.bfloat16())
    with pytest.raises(ValueError, match="int64"):
        per_sample_sq_err_sum(x.long(), x.long())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sq_err_kernel_gpu(dtype):
    ok, why = triton_status("cuda")
    if not ok:
        pytest.skip(why)
    for shape in [(1, 1), (2, 4097), (4, 16, 21, 30, 52), (2, 3_000_001)]:
        pred = torch.randn(shape, device="cuda").to(dtype).requires_grad_()
        target = torch.randn(shape, device="cuda").to(dtype).requires_grad_()
        out = per_sample_sq_err_sum(pred, target)
        torch.testing.assert_close(out, sq_err_sum_reference(pred, target), rtol=1e-5, atol=1e-5)
        g_N = torch.randn(shape[0], device="cuda")
        gp, gt = torch.autograd.grad(out, (pred, target), g_N)
        torch.testing.assert_close(gp, sq_err_sum_backward_reference(pred, target, g_N), rtol=2**-7, atol=1e-5)
        torch.testing.assert_close(gt, -gp)
        torch.testing.assert_close(per_sample_sq_err_sum(pred, target), out, rtol=0, atol=0)  # deterministic

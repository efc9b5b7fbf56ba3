"""Per-sample squared error on one rank (the CP reduction is tested in tests/distributed/test_objective_cp.py)."""
from __future__ import annotations

import pytest
import torch

from kernels.sq_err import per_sample_sq_err_sum
from megatron_regdpo.objectives.per_sample import per_sample_sq_err, sum_across_group, torch_sq_err_sum

SHAPE_BCFHW = (4, 3, 2, 5, 7)


def test_mean_over_all_element_dims_per_sample():
    pred, target = torch.randn(SHAPE_BCFHW, dtype=torch.float64), torch.randn(SHAPE_BCFHW, dtype=torch.float64)
    err_B = per_sample_sq_err(pred, target)
    torch.testing.assert_close(err_B, (pred - target).square().mean(dim=(1, 2, 3, 4)))
    assert err_B.dtype == torch.float64


def test_bf16_accumulates_in_fp32():
    pred, target = torch.randn(SHAPE_BCFHW).bfloat16(), torch.randn(SHAPE_BCFHW).bfloat16()
    err_B = per_sample_sq_err(pred, target)
    assert err_B.dtype == torch.float32
    torch.testing.assert_close(err_B, (pred.float() - target.float()).square().mean(dim=(1, 2, 3, 4)))


def test_gradient_is_two_diff_over_count():
    pred = torch.randn(SHAPE_BCFHW, dtype=torch.float64, requires_grad=True)
    target = torch.randn(SHAPE_BCFHW, dtype=torch.float64)
    g_B = torch.randn(4, dtype=torch.float64)
    (grad,) = torch.autograd.grad(per_sample_sq_err(pred, target), pred, g_B)
    count = pred[0].numel()
    torch.testing.assert_close(grad, 2 * (pred - target).detach() / count * g_B.view(-1, 1, 1, 1, 1))


def test_no_group_is_a_no_op():
    x = torch.randn(3, requires_grad=True)
    assert sum_across_group(x, None) is x


def test_kernel_function_plugs_in():
    pred = torch.randn(SHAPE_BCFHW, requires_grad=True)
    target = torch.randn(SHAPE_BCFHW)
    a = per_sample_sq_err(pred, target)
    b = per_sample_sq_err(pred, target, sq_err_sum_fn=per_sample_sq_err_sum)
    torch.testing.assert_close(a, b)
    g = torch.randn(4)
    torch.testing.assert_close(torch.autograd.grad(a, pred, g), torch.autograd.grad(b, pred, g))
    torch.testing.assert_close(torch_sq_err_sum(pred, target), per_sample_sq_err_sum(pred, target))


def test_user_errors():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"\(2, 3\) vs \(2, 4\)"):
        per_sample_sq_err(x, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\(5,\)"):
        per_sample_sq_err(torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match=r"\(2, 0\)"):
        per_sample_sq_err(torch.randn(2, 0), torch.randn(2, 0))
    with pytest.raises(ValueError, match=r"returned shape \(\)"):
        per_sample_sq_err(x, x, sq_err_sum_fn=lambda p, t: (p - t).sum())

"""Torch reference for the per-sample squared-error sum: the definition the Triton kernel must match.

Legend: N samples (a stacked pair batch); M elements per sample (everything after dim 0, flattened).

    sum_N[n]        = sum_m (pred[n, m] - target[n, m])^2          accumulated in >= float32
    grad_pred[n, m] = 2 * (pred[n, m] - target[n, m]) * g_N[n]     (g_N = dL/dsum_N), in pred's dtype
    grad_target     = -grad_pred
"""
from __future__ import annotations

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16/fp32 -> fp32, fp64 -> fp64


def sq_err_sum_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    acc = accumulate_dtype(pred.dtype)
    diff_NM = pred.reshape(pred.shape[0], -1).to(acc) - target.reshape(target.shape[0], -1).to(acc)
    return diff_NM.square().sum(dim=1)


def sq_err_sum_backward_reference(pred: torch.Tensor, target: torch.Tensor, grad_N: torch.Tensor) -> torch.Tensor:
    """grad with respect to pred; the gradient with respect to target is its negative."""
    acc = accumulate_dtype(pred.dtype)
    g = grad_N.to(acc).reshape(-1, *([1] * (pred.ndim - 1)))
    return ((pred.to(acc) - target.to(acc)) * (2 * g)).to(pred.dtype)  # the kernel's order: bf16 agrees bitwise

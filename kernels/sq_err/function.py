"""`per_sample_sq_err_sum`: the autograd entry point; Triton on CUDA when usable, the torch reference else.

Legend: N samples; pred and target are [N, ...] of one shape, dtype and device. Returns [N] sums in float32
(float64 for float64 inputs). Gradients flow to pred and, when it requires grad, to target.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..capability import triton_status
from .reference import sq_err_sum_backward_reference, sq_err_sum_reference

BACKENDS = ("auto", "torch", "triton")


class _PerSampleSqErrSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, use_triton: bool):
        ctx.save_for_backward(pred, target)  # saved as is: the backward re-reads them, no diff is kept
        ctx.use_triton = use_triton
        if use_triton:
            from .triton_kernels import sq_err_sum_fwd_triton
            return sq_err_sum_fwd_triton(pred, target)
        return sq_err_sum_reference(pred, target)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_N):
        pred, target = ctx.saved_tensors
        need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_pred or need_target):
            return None, None, None
        if ctx.use_triton:
            from .triton_kernels import sq_err_sum_bwd_triton
            grad_pred, grad_target = sq_err_sum_bwd_triton(pred, target, grad_N, need_target)
        else:
            grad_pred = sq_err_sum_backward_reference(pred, target, grad_N)
            grad_target = (-grad_pred).to(target.dtype) if need_target else None
        return (grad_pred if need_pred else None), grad_target, None


def resolve_backend(pred: torch.Tensor, backend: str = "auto") -> str:
    """'triton' or 'torch': what per_sample_sq_err_sum(pred, ..., backend) runs (ValueError if impossible)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return "triton" if _use_triton(pred, backend) else "torch"


def _use_triton(pred: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        ok, why = triton_status(pred.device)
        if not ok:
            raise ValueError(f"backend='triton' but Triton is not usable for {pred.device}: {why}")
        if pred.dtype == torch.float64:
            raise ValueError("backend='triton' takes float16, bfloat16 or float32, got torch.float64")
        return True
    # auto: the kernel pays off on GPUs only; float64 (tests, references) stays exact in torch
    return pred.is_cuda and pred.dtype != torch.float64 and triton_status(pred.device)[0]


def per_sample_sq_err_sum(pred: torch.Tensor, target: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """sum over all non-batch elements of (pred - target)^2 -> [N], float32 accumulation for bf16/fp16.

    backend: "auto" (Triton for CUDA tensors when usable, else torch), "torch", or "triton" (also on CPU
    under TRITON_INTERPRET=1, which is how the tests run it).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim < 2 or pred.shape[0] == 0:
        raise ValueError(f"expected [N, ...] with N >= 1 and at least one element dim, got {tuple(pred.shape)}")
    if pred.dtype != target.dtype or pred.device != target.device:
        raise ValueError(f"pred and target differ: {pred.dtype} on {pred.device} vs {target.dtype} on {target.device}")
    if not pred.is_floating_point():
        raise ValueError(f"expected floating-point tensors, got {pred.dtype}")
    return _PerSampleSqErrSum.apply(pred, target, _use_triton(pred, backend))

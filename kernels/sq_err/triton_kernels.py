"""Triton kernels for the per-sample squared-error sum (definition: reference.py). Imported lazily.

Legend: N samples, M elements per sample; inputs are viewed as contiguous [N, M].

Forward, ONE pass over pred and target, deterministic two-stage reduction:
  grid (N, C): program (n, c) reads chunk c of sample n (ITERS tiles of BLOCK elements), accumulates
  (pred - target)^2 in float32 registers and writes ONE partial sum to partial_NC[n, c]. The C partials
  per sample are then summed by torch (N*C floats, a few KB). No atomics: the same input and shape give
  bitwise the same result on every run, which keeps DPO's s (a small difference of large errors)
  reproducible. The price is one extra tiny launch.
Backward, one pass: grid (N, C) again; program (n, c) reads its chunk of pred and target and g_N[n] and
  writes grad_pred = 2 * (pred - target) * g_N[n] (and grad_target = -grad_pred when asked, same pass).
The kernels return SUMS: the 1/count of the mean is applied by the caller after the context-parallel
reduction of sums and counts (megatron_regdpo/objectives/per_sample.py), so nothing here needs the count.

Row offsets are int64 (N*M can pass 2**31 for video latents). Inputs of float16, bfloat16 and float32;
float64 stays on the torch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024          # elements per tile: 4 warps x 32 threads x 8 elements (16-byte bf16 loads)
TARGET_PROGRAMS = 1024  # enough programs to fill an H100 (132 SMs) several times over
MAX_ITERS = 64
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _sq_err_partial_fwd(pred_ptr, target_ptr, partial_ptr, M, num_chunks,
                        BLOCK: tl.constexpr, ITERS: tl.constexpr):
    n = tl.program_id(0)
    c = tl.program_id(1)
    row = n.to(tl.int64) * M
    start = c.to(tl.int64) * (BLOCK * ITERS)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        idx = start + i * BLOCK + offs
        mask = idx < M
        p = tl.load(pred_ptr + row + idx, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + row + idx, mask=mask, other=0.0).to(tl.float32)
        d = p - t
        acc += d * d
    tl.store(partial_ptr + n * num_chunks + c, tl.sum(acc, axis=0))


@triton.jit
def _sq_err_bwd(pred_ptr, target_ptr, g_ptr, grad_pred_ptr, grad_target_ptr, M,
                BLOCK: tl.constexpr, ITERS: tl.constexpr, WRITE_TARGET_GRAD: tl.constexpr):
    n = tl.program_id(0)
    c = tl.program_id(1)
    row = n.to(tl.int64) * M
    start = c.to(tl.int64) * (BLOCK * ITERS)
    offs = tl.arange(0, BLOCK)
    two_g = 2.0 * tl.load(g_ptr + n).to(tl.float32)
    for i in range(ITERS):
        idx = start + i * BLOCK + offs
        mask = idx < M
        p = tl.load(pred_ptr + row + idx, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + row + idx, mask=mask, other=0.0).to(tl.float32)
        grad = (p - t) * two_g
        tl.store(grad_pred_ptr + row + idx, grad.to(grad_pred_ptr.dtype.element_ty), mask=mask)
        if WRITE_TARGET_GRAD:
            tl.store(grad_target_ptr + row + idx, (-grad).to(grad_target_ptr.dtype.element_ty), mask=mask)


def _launch_shape(N: int, M: int, iters: int | None = None) -> tuple[int, int]:
    """(ITERS, chunks per sample): about TARGET_PROGRAMS programs in all, ITERS a power of two (each value
    is one compiled variant). `iters` forces it (tests use it to cover several tiles and chunks per row)."""
    if iters is not None:
        return iters, triton.cdiv(M, BLOCK * iters)
    chunks_wanted = max(1, TARGET_PROGRAMS // N)
    iters = min(MAX_ITERS, triton.next_power_of_2(max(1, triton.cdiv(M, BLOCK * chunks_wanted))))
    return iters, triton.cdiv(M, BLOCK * iters)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton path takes {SUPPORTED_DTYPES}, got {x.dtype}")
    return x.reshape(x.shape[0], -1).contiguous()  # a view when already contiguous


def sq_err_sum_fwd_triton(pred: torch.Tensor, target: torch.Tensor, iters: int | None = None) -> torch.Tensor:
    pred_NM, target_NM = _as_rows(pred), _as_rows(target)
    N, M = pred_NM.shape
    if M == 0:  # an empty token slice (possible on a CP rank): nothing to read
        return torch.zeros(N, dtype=torch.float32, device=pred.device)
    iters, chunks = _launch_shape(N, M, iters)
    partial_NC = torch.empty((N, chunks), dtype=torch.float32, device=pred.device)
    _sq_err_partial_fwd[(N, chunks)](pred_NM, target_NM, partial_NC, M, chunks, BLOCK=BLOCK, ITERS=iters)
    return partial_NC.sum(dim=1)


def sq_err_sum_bwd_triton(pred: torch.Tensor, target: torch.Tensor, grad_N: torch.Tensor,
                          need_target_grad: bool, iters: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    pred_NM, target_NM = _as_rows(pred), _as_rows(target)
    N, M = pred_NM.shape
    if M == 0:
        return torch.zeros_like(pred), (torch.zeros_like(target) if need_target_grad else None)
    iters, chunks = _launch_shape(N, M, iters)
    g_N = grad_N.to(torch.float32).contiguous()
    grad_pred_NM = torch.empty_like(pred_NM)
    grad_target_NM = torch.empty_like(target_NM) if need_target_grad else grad_pred_NM  # unused if not asked
    _sq_err_bwd[(N, chunks)](pred_NM, target_NM, g_N, grad_pred_NM, grad_target_NM, M,
                             BLOCK=BLOCK, ITERS=iters, WRITE_TARGET_GRAD=need_target_grad)
    grad_target = grad_target_NM.view(target.shape) if need_target_grad else None
    return grad_pred_NM.view(pred.shape), grad_target

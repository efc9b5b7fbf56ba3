"""Per-sample squared error, correct under context (and sequence) parallelism.

Legend: B samples (a stacked pair batch: winners then losers); C, F, H, W latent dims, or any token layout:
under CP each rank holds a slice of the token axis, so the local tensors are [B, <local elements>].

    err_B = sum over all elements of (pred - target)^2  /  number of elements     (per sample)

DPO is non-linear in err (a log-sigmoid of a difference of errors), so a rank must not plug the error of its
own token slice into the loss: the per-sample SUM and the element COUNT are first summed over the CP group,
and every rank then computes the same, full loss. See `sum_across_group` for why its backward is the
identity.

The local sum is plain torch by default; a trainer on GPU may pass the fused kernel
(`kernels.per_sample_sq_err_sum`) as `sq_err_sum_fn`. This module imports only torch.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

SqErrSumFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pred [B, ...], target [B, ...]) -> [B]


def _group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


class _SumAcrossGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        total = x.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return grad_total, None


def sum_across_group(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-reduce(SUM) over `group` in forward; IDENTITY in backward. No-op for group None or of size 1.

    Why identity: total = sum_r x_r, and every rank computes the same loss L(total) from it. The gradient
    of L with respect to rank r's partial sum is dL/dtotal * dtotal/dx_r = dL/dtotal, which each rank
    already holds, so backward passes it through unchanged. Each partial sum then receives dL/dtotal exactly
    once. An all-reduce in backward (the adjoint one would write for a generic all-reduce whose downstream
    differs per rank) would sum the G identical copies and scale the gradient by the group size G.
    Parameter gradients stay rank-local partials; the usual data-parallel/CP gradient all-reduce (a SUM over
    the CP ranks) completes them.
    """
    if _group_size(group) == 1:
        return x
    return _SumAcrossGroup.apply(x, group)


def torch_sq_err_sum(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of (pred - target)^2 -> [B], accumulated in at least float32."""
    acc = torch.promote_types(pred.dtype, torch.float32)
    return (pred.to(acc) - target.to(acc)).square().flatten(1).sum(dim=1)


def per_sample_sq_err(pred: torch.Tensor, target: torch.Tensor, group=None,
                      sq_err_sum_fn: SqErrSumFn | None = None) -> torch.Tensor:
    """Mean over all non-batch elements of (pred - target)^2, per sample -> [B] (at least float32).

    `group`: the process group whose ranks hold the other slices of each sample (CP, or CP x TP/SP where the
    output is split); None for a whole sample on this rank. Its ranks must hold DISJOINT slices: a rank
    holding a replica (TP ranks after the output is gathered) would be counted twice. The element count is
    reduced too, so slices of unequal size (tokens not divisible by the CP degree) are weighted correctly.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim < 2:
        raise ValueError(f"expected [B, ...] with at least one element dim, got shape {tuple(pred.shape)}")
    if pred[0].numel() == 0 and _group_size(group) == 1:
        raise ValueError(f"no elements per sample: shape {tuple(pred.shape)}")
    local_sum_B = (sq_err_sum_fn or torch_sq_err_sum)(pred, target)
    if local_sum_B.shape != pred.shape[:1]:
        raise ValueError(f"sq_err_sum_fn returned shape {tuple(local_sum_B.shape)}, expected ({pred.shape[0]},)")
    total_sum_B = sum_across_group(local_sum_B, group)
    if _group_size(group) == 1:
        return total_sum_B / pred[0].numel()
    with torch.no_grad():  # an integer, nothing to differentiate; kept on device: no host sync
        count = torch.tensor([pred[0].numel()], dtype=torch.int64, device=pred.device)
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return total_sum_B / count.to(total_sum_B.dtype)

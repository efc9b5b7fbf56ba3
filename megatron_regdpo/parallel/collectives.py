"""Autograd-aware sums over a process group, for tensors every rank then uses differently.

- all_reduce_sum: sum in forward AND backward. Each rank's output feeds its own part of the loss (its own
  heads, e.g. the across-heads q/k RMSNorm statistics under TP), so the true gradient of each input is
  the sum of every rank's.
- sum_grad_over_group: identity in forward, sum of the gradient in backward. For a replicated tensor that
  each rank applies to its own slice of the tokens (the adaLN modulation under sequence parallelism).
(objectives.per_sample.sum_across_group is the third case, sum forward / identity backward, for a loss
every rank computes identically; it lives there because objectives import only torch.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group in forward; every rank's output feeds the loss, so backward sums too."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-reduce(sum); the identity for a group of one."""
    if group_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


class _SumGrad(torch.autograd.Function):
    """Identity in forward; all-reduce(SUM) of the gradient in backward.

    For a replicated tensor that each rank then uses on its own slice of the tokens (the adaLN
    modulation under sequence parallelism): every rank's gradient is partial, the true one is the sum.
    megatron-core's copy_to_tensor_model_parallel_region means the same but all-reduces
    `grad.contiguous()` in place and returns `grad`, which loses the sum whenever the incoming gradient
    is not contiguous (here it arrives through a transpose), so we reduce into a tensor we return.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_grad_over_group(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _SumGrad.apply(x, group)

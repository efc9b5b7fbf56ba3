"""Autograd-aware sums over a process group, for tensors every rank then uses differently.

- sum_grad_over_group: identity in forward, sum of the gradient in backward. For a replicated tensor that
  each rank applies to its own slice of the tokens (the adaLN modulation under sequence parallelism).
Elsewhere: the across-heads q/k RMSNorm sums its statistic over TP in forward and backward itself
(models/wan/lean.py); objectives.per_sample.sum_across_group sums forward / passes backward, for a loss
every rank computes identically (it lives there because objectives import only torch).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


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

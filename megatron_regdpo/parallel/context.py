"""Context parallelism over the video token sequence, with torch.distributed collectives only.

Each CP rank holds one contiguous chunk of the tokens (DiT attention is not causal, so contiguous
chunks are balanced). Self-attention needs every rank's keys and values: they are all-gathered in
forward, and in backward each rank receives the sum of every rank's gradient for its own chunk
(reduce-scatter), which is what makes the attention exact across ranks. Cross-attention to the
text/image context needs nothing: the context is replicated.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import group_size


def chunk_bounds(tokens: int, group) -> tuple[int, int]:
    """[start, end) of this rank's chunk; a clear error when the sequence does not divide."""
    size = group_size(group)
    if tokens % size:
        raise ValueError(f"video token count {tokens} is not divisible by the context-parallel size {size}; "
                         f"choose frames/height/width so that (latent F)*(H/2)*(W/2) divides by {size}")
    per = tokens // size
    rank = 0 if size == 1 else dist.get_rank(group)
    return rank * per, (rank + 1) * per


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along dim 0; backward reduce-scatters (sums every rank's grad of this rank's chunk)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        size = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


class _GatherReplicated(torch.autograd.Function):
    """All-gather along `dim` for computation that is then REPLICATED on every rank: backward keeps
    this rank's slice of the (identical) gradient instead of summing it."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(dist.get_world_size(ctx.group), dim=ctx.dim)[dist.get_rank(ctx.group)].contiguous(), None, None


def all_gather_seq(x_SBX: torch.Tensor, group) -> torch.Tensor:
    return x_SBX if group_size(group) == 1 else _AllGatherSeq.apply(x_SBX, group)


def gather_replicated(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherReplicated.apply(x, group, dim)

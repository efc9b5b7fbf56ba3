"""FSDP2 shards in megatron-core's checkpoint format: one key space for every layout.

megatron-core's `sharded_state_dict()` describes a TP shard of each weight (a ShardedTensor: key, global
shape, offset of this rank's piece). Under FSDP2 a parameter is a DTensor whose local tensor is a
dim-0 slice (torch.chunk over the DP x CP ranks, so possibly uneven or empty) of that TP shard. Here each
ShardedTensor is narrowed to the local slice: the offset moves by the slice's start, the piece becomes
irregular (`axis_fragmentations=None`: dist_checkpointing stores uneven pieces through DCP), and its data-
parallel replica index becomes 0 (the DP ranks now hold different pieces, not copies). The keys stay the
model's, so a checkpoint written with FSDP2 loads without it and the other way round, at any TP/PP/DP
(dist_checkpointing reshards on load).
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch.distributed.tensor import DTensor, Shard


def _slice_start(length: int, world: int, rank: int) -> int:
    """Where rank `rank`'s torch.chunk piece of `length` rows starts (FSDP2's and DTensor's rule)."""
    per = -(-length // world)
    return min(per * rank, length)


def narrow_to_local(sh: ShardedTensor, data: DTensor, local_data: torch.Tensor | None = None) -> ShardedTensor | None:
    """`sh` (describing the whole of `data`'s global tensor) narrowed to `data`'s local shard; None when
    this rank's shard is empty. `local_data` replaces the data (optimizer states shaped like the shard)."""
    (placement,) = data.placements
    if not isinstance(placement, Shard):
        raise ValueError(f"{sh.key}: FSDP2 parameter placed as {placement}, expected Shard(dim)")
    dim, piece = placement.dim, data.to_local() if local_data is None else local_data
    if piece.numel() == 0:
        return None
    start = _slice_start(data.shape[dim], data.device_mesh.size(), data.device_mesh.get_local_rank())
    offset = list(sh.global_offset)
    offset[sh.prepend_axis_num + dim] += start
    replica = sh.replica_id
    replica = (*replica[:-1], 0) if isinstance(replica, tuple) else 0
    return dataclasses.replace(sh, data=piece, local_shape=tuple(piece.shape), global_offset=tuple(offset),
                               axis_fragmentations=None, replica_id=replica, dtype=piece.dtype)


def local_shards(sharded_state: dict, mesh=None) -> dict:
    """The model's sharded state dict with every DTensor-backed ShardedTensor narrowed to its local shard."""
    out = {}
    for name, sh in sharded_state.items():
        if isinstance(sh, ShardedTensor) and isinstance(sh.data, DTensor):
            narrowed = narrow_to_local(sh, sh.data)
            if narrowed is not None:
                out[name] = narrowed
        else:
            out[name] = sh
    return out


def copy_into_shards(module: torch.nn.Module, loaded: dict) -> None:
    """Copy loaded local shards (and whole buffers/extra state) into the FSDP2 module's tensors."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("_extra_state"):
                continue
            target = params.get(name, tensor)
            target = target.to_local() if isinstance(target, DTensor) else target
            if target.numel() == 0:
                continue
            if name not in loaded:
                raise KeyError(f"checkpoint has no value for {name}")
            target.copy_(loaded[name])

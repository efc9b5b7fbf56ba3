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
    # megatron stores irregular pieces as plain chunks of the global tensor: the prepended axes (a layer's
    # index in the stacked `decoder.layers.*` tensors) become leading axes of size 1 of the piece itself
    piece = piece.reshape((1,) * sh.prepend_axis_num + tuple(piece.shape))
    return dataclasses.replace(sh, data=piece, local_shape=tuple(piece.shape), global_offset=tuple(offset),
                               axis_fragmentations=None, replica_id=replica, dtype=piece.dtype, prepend_axis_num=0)


GEOMETRY = "_fsdp2_checkpoint_geometry"
EXTRA_STATE = "_extra_state"  # torch's state-dict suffix of a module's get_extra_state()


def record_geometry(module: torch.nn.Module) -> None:
    """Remember the module's checkpoint description (keys, global shapes, TP offsets, replica ids) while its
    parameters are still plain tensors: call before `fully_shard`. (megatron-core's own FSDP2 branch in its
    sharded-tensor helpers assumes even shards and gathers whole tensors for small dims; the description of
    the TP shard, narrowed here, holds for any shard.)"""
    setattr(module, GEOMETRY, {name: sh.without_data() for name, sh in module.sharded_state_dict().items()})


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are FSDP2 shards (DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def geometry(module: torch.nn.Module) -> dict:
    if not hasattr(module, GEOMETRY):
        raise RuntimeError("an FSDP2 module without a recorded checkpoint geometry: call record_geometry(module) "
                           "before fully_shard")
    return getattr(module, GEOMETRY)


def local_shards(module: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    """The FSDP2 module's sharded state dict: each parameter narrowed to this rank's shard (an empty shard
    is left out), in `dtype` when given (fp32 master shards are saved as the model's 16-bit weights, as
    megatron-core's mixed-precision optimizer saves them), extra state as the owning module has it now."""
    params, out = dict(module.named_parameters()), {}
    for name, sh in geometry(module).items():
        if isinstance(sh, ShardedTensor):
            p = params[name]
            cast = dtype is not None and p.dtype != dtype
            narrowed = narrow_to_local(sh, p, local_data=p.to_local().to(dtype) if cast else None)
            if narrowed is not None:
                out[name] = narrowed
        elif name.endswith(EXTRA_STATE):
            out[name] = dataclasses.replace(sh, data=_owner(module, name).get_extra_state())
        else:
            raise ValueError(f"{name}: unexpected {type(sh).__name__} in an FSDP2 module's checkpoint description")
    return out


def copy_into_shards(module: torch.nn.Module, loaded: dict) -> None:
    """Copy loaded local shards (and whole buffers) into the FSDP2 module's tensors, and the loaded extra
    state into its owning submodules. Extra state `loaded` lacks keeps the module's own (megatron_ckpt.
    load_sharded's rule: a checkpoint written by the local backend has none of TE's FP8 metadata); any other
    tensor it lacks is an error naming it."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith(EXTRA_STATE):
                if name in loaded:
                    _owner(module, name).set_extra_state(loaded[name])
                continue
            target = params.get(name, tensor)
            target = target.to_local() if isinstance(target, DTensor) else target
            if target.numel() == 0:
                continue
            if name not in loaded:
                raise KeyError(f"checkpoint has no value for {name}")
            target.copy_(loaded[name].reshape(target.shape))


def _owner(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule whose get/set_extra_state the state-dict key `name` (`<path>._extra_state`) stands for."""
    return module.get_submodule(name[:-len(EXTRA_STATE)].rstrip("."))

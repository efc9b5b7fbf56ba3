"""FSDP2 (torch's `fully_shard`) as our weight sharding: the data-parallel wrapper of `parallel.fsdp=true`.

Applied last in the build order (TP/SP, CP and recompute are in the model already): every WanLayer is one
unit, the rest of the stage (embeddings, conditioning, head) is the root unit. Parameters are sharded
over the data-parallel x context-parallel ranks (megatron-core's `dp_cp` group: CP ranks hold the same
weights and see other tokens, exactly as DDP averages over DP x CP). A TP-split weight's local TP shard is
what FSDP2 shards further (dim 0), so each element lives on exactly one rank of (pp, tp, dp x cp).

Precision: trainable parameters are kept sharded in fp32 (the master weights, what megatron's
mixed-precision optimizer keeps beside bf16 weights), frozen ones in the model's dtype; the forward and
backward run in the model's dtype (`MixedPrecisionPolicy.param_dtype`) and gradients are reduced in fp32
when `parallel.grad_reduce_in_fp32` (else in the model's dtype).

What megatron-core's DDP does after the backward and FSDP2 does not (`finalize_grads`): sum the gradients
of `sequence_parallel` parameters (norms, modulation tables, SP LoRA adapters: each TP rank saw its own
tokens) over TP, and of `pipeline_parallel` ones (the conditioning, on every stage) over PP. Gradients
are reduce-scattered after every micro-batch's backward (the memory of a sharded gradient, never a
whole one): `no_sync` is a no-op.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from megatron_regdpo.checkpoint_io.fsdp2_shards import copy_into_shards, local_shards, record_geometry

# the tags megatron-core's layers and ours put on parameters; FSDP2 replaces every parameter by a new
# DTensor parameter, so they are carried over by hand
PARAM_TAGS = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel",
              "pipeline_parallel", "shared", "allreduce")


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class FSDP2Model(torch.nn.Module):
    """What megatron-core's schedules and our trainer ask of a data-parallel wrapper: `.module`, `.config`,
    `no_sync`, `zero_grad_buffer`, `finish_grad_sync`, plus `finalize_grads` (our finalize_model_grads)
    and the checkpoint protocol of training/checkpoint.py."""

    def __init__(self, module: torch.nn.Module, pg_collection, compute_dtype: torch.dtype,
                 grad_reduce_in_fp32: bool = True):
        super().__init__()
        self.module, self.config = module, module.config
        self.tp_group, self.pp_group, self.dp_cp_group = pg_collection.tp, pg_collection.pp, pg_collection.dp_cp
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.mesh = DeviceMesh.from_group(self.dp_cp_group, device_type=device, mesh_dim_names=("dp_cp",))
        record_geometry(module)  # the checkpoint's description of each weight, taken before sharding
        tags = {name: {t: getattr(p, t) for t in PARAM_TAGS if hasattr(p, t)} for name, p in module.named_parameters()}
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype,
                                      reduce_dtype=torch.float32 if grad_reduce_in_fp32 else compute_dtype,
                                      cast_forward_inputs=False)  # the model casts its inputs itself
        units = [m for m in module.modules() if isinstance(m, tuple(getattr(module, "fsdp_unit_modules", ())))]
        for unit in units:  # one unit at a time: at most one unit's fp32 copy exists unsharded
            _master_weights_fp32(unit)
            fully_shard(unit, mesh=self.mesh, mp_policy=policy, reshard_after_forward=True)
        _master_weights_fp32(module)  # the root's own (the units' are shards by now)
        # a trained model's root parameters are used again right at the start of the backward: kept gathered;
        # a frozen one (a reference) has no backward and gives its memory back after each forward
        frozen = not any(p.requires_grad for p in module.parameters())
        fully_shard(module, mesh=self.mesh, mp_policy=policy, reshard_after_forward=frozen)
        for name, p in module.named_parameters():
            for tag, value in tags[name].items():
                setattr(p, tag, value)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        return contextlib.nullcontext()

    def zero_grad_buffer(self) -> None:
        for p in self.module.parameters():
            p.grad = None

    def finish_grad_sync(self) -> None:
        """FSDP2 reduce-scatters during the backward; what remains is `finalize_grads`."""

    def finalize_grads(self) -> None:
        """The cross-rank gradient sums that FSDP2's reduce-scatter over DP x CP does not do."""
        _sum_local_grads([p for p in self.module.parameters() if getattr(p, "sequence_parallel", False)],
                         self.tp_group)
        _sum_local_grads([p for p in self.module.parameters() if getattr(p, "pipeline_parallel", False)],
                         self.pp_group)

    def parameters_for_norm(self) -> list[torch.nn.Parameter]:
        """Each gradient element counted once over the world: a TP-replicated parameter on TP rank 0 only,
        the conditioning (replicated on every stage) on the first stage only; FSDP2 shards are disjoint."""
        tp_rank, pp_rank = dist.get_rank(self.tp_group), dist.get_rank(self.pp_group)
        return [p for p in self.module.parameters() if p.requires_grad
                and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
                and (not getattr(p, "pipeline_parallel", False) or pp_rank == 0)]

    # the checkpoint protocol of training/checkpoint.py
    def checkpoint_sharded_state_dict(self) -> dict:
        return local_shards(self.module, dtype=self.config.params_dtype)

    def load_checkpoint_state(self, loaded: dict) -> None:
        copy_into_shards(self.module, loaded)


def frozen_sharding(parallel, pg_collection, compute_dtype: torch.dtype):
    """How a frozen model (a resident reference) is sharded like the policy under `parallel.fsdp`: a function
    module -> the FSDP2-sharded module; None without FSDP (the trainer and the planner use the same)."""
    if not parallel.fsdp:
        return None

    def shard(frozen: torch.nn.Module) -> torch.nn.Module:
        return FSDP2Model(frozen, pg_collection, compute_dtype, parallel.grad_reduce_in_fp32).module
    return shard


def _master_weights_fp32(module: torch.nn.Module) -> None:
    """Trainable, not yet sharded parameters of `module` to fp32 (what the optimizer updates)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad and p.dtype != torch.float32 and not isinstance(p, DTensor):
                p.data = p.data.float()


def _sum_local_grads(params: list, group) -> None:
    """All-reduce (sum) the local gradient shards of `params` over `group`, as one flat buffer."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def finalize_fsdp2_grads(model_chunks: list, num_tokens=None, *args, **kwargs) -> None:
    """megatron-core's `finalize_model_grads_func` signature, for FSDP2-wrapped chunks."""
    if num_tokens is not None:
        raise ValueError("per-token loss scaling is not used by this trainer")
    for chunk in model_chunks:
        chunk.finalize_grads()

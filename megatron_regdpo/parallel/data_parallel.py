"""Data-parallel wrapping, the last step of the build order (TP/SP/CP and recompute are in the model
already): megatron-core DDP (optionally with the distributed optimizer's sharded buffers), or FSDP2
(`parallel.fsdp`, parallel/fsdp2.py), which shards the weights, gradients and optimizer state."""
from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP/FSDP wrappers (forward_tokens, patchify, checkpoint keys live there)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def ddp_config(parallel) -> DistributedDataParallelConfig:
    """Our `parallel` config section -> megatron's DDP config (without FSDP)."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=parallel.grad_reduce_in_fp32, overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.distributed_optimizer, check_for_nan_in_grad=False)


def wrap_data_parallel(model: torch.nn.Module, parallel, pg_collection) -> torch.nn.Module:
    if parallel.fsdp:
        from .fsdp2 import FSDP2Model

        return FSDP2Model(model, pg_collection, compute_dtype=model.config.params_dtype,
                          grad_reduce_in_fp32=parallel.grad_reduce_in_fp32)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config(parallel), module=model,
                                   pg_collection=pg_collection)

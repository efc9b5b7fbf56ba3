"""Data-parallel wrapping: megatron-core DDP (optionally with the distributed optimizer's sharded
buffers) or Megatron-FSDP. The last step of build order: TP/SP/CP are in the model already."""
from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP/FSDP wrappers (forward_tokens, patchify, checkpoint keys live there)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def ddp_config(parallel) -> DistributedDataParallelConfig:
    """Our `parallel` config section -> megatron's DDP config."""
    if parallel.fsdp:
        return DistributedDataParallelConfig(
            grad_reduce_in_fp32=parallel.grad_reduce_in_fp32, use_distributed_optimizer=True,
            use_megatron_fsdp=True, data_parallel_sharding_strategy="optim_grads_params")
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=parallel.grad_reduce_in_fp32, overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.distributed_optimizer, check_for_nan_in_grad=False)


def wrap_data_parallel(model: torch.nn.Module, parallel, pg_collection) -> torch.nn.Module:
    cfg = ddp_config(parallel)
    if cfg.use_megatron_fsdp:
        if not torch.cuda.is_available():
            # megatron-core's FSDP builds DeviceMesh(device_type="cuda"), calls Tensor.cuda() when it
            # validates its shards and runs on CUDA streams: there is no CPU path to patch narrowly.
            raise ValueError("parallel.fsdp=true (Megatron-FSDP) needs CUDA GPUs; on CPU use "
                             "parallel.distributed_optimizer=true, which shards the optimizer state the same way")
        from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel

        # the unit of sharding is the model's block class (megatron-core's default, TransformerLayer,
        # matches no module of a Wan model and leaves nothing to shard)
        return FullyShardedDataParallel(config=model.config, ddp_config=cfg, module=model,
                                        pg_collection=pg_collection,
                                        fsdp_unit_modules=list(getattr(model, "fsdp_unit_modules", ())))
    return DistributedDataParallel(config=model.config, ddp_config=cfg, module=model, pg_collection=pg_collection)

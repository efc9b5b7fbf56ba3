"""Process groups: Megatron-Core builds them once; our code receives them as a ProcessGroupCollection.

`init_distributed` is the single entry point (torchrun, spawned test ranks, or one process).
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection

from . import cpu_compat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int = 1, pp: int = 1, cp: int = 1, rank: int | None = None,
                     world_size: int | None = None, backend: str | None = None,
                     seed: int = 1234) -> ProcessGroupCollection:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) and Megatron's groups; return them."""
    cpu_compat.apply()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        launched = world_size is None and "TORCHELASTIC_RUN_ID" in os.environ  # torchrun, even with one rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if backend == "fake":
            # torch's fake process group: one process plays `rank` of `world_size`, collectives move no
            # data (the capacity planner simulates a rank of a large world under fake tensors)
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group(backend="fake", store=FakeStore(), rank=rank or 0, world_size=world_size)
        elif world_size == 1 and not launched:
            # one process (tools, dry runs, plain `python -m`): a private rendezvous on a free port, never
            # an inherited MASTER_PORT that another process may hold
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1)
        else:  # a launcher (torchrun, our spawn) set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (its store)
            rank = int(os.environ.get("RANK", 0)) if rank is None else rank
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    if parallel_state.model_parallel_is_initialized():
        sizes = (parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_pipeline_model_parallel_world_size(),
                 parallel_state.get_context_parallel_world_size())
        if sizes == (tp, pp, cp):
            return ProcessGroupCollection.use_mpu_process_groups()
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        create_gloo_process_groups=False)
    # the RNG tracker megatron-core forks for sequence parallelism and recompute (no dropout in Wan,
    # but the tracker must exist); TP ranks get distinct model-parallel streams as usual
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def groups_from_config(parallel, seed: int = 1234) -> ProcessGroupCollection:
    """The process groups of a `parallel` config section (torchrun or spawned ranks)."""
    return init_distributed(parallel.tp, parallel.pp, parallel.cp, seed=seed)


@contextmanager
def distributed_session(tp: int = 1, pp: int = 1, cp: int = 1, world_size: int | None = None, seed: int = 1234):
    """init_distributed for a tool or command; tears down only what it set up itself.
    `world_size=1` asks for a private one-process world whatever the environment says."""
    owner = not dist.is_initialized()
    pg = init_distributed(tp, pp, cp, world_size=world_size, seed=seed)
    try:
        yield pg
    finally:
        if owner:
            destroy_distributed()


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

"""One forward/backward over the micro-batches of a step, through megatron-core's schedules.

Works for every layout: without pipeline parallelism megatron-core picks its no-pipelining schedule,
with it 1F1B (or interleaved for virtual stages). The schedule sums micro-batch losses, scales them by
CP size and divides by the number of micro-batches; DDP then averages gradients over DP x CP.
"""
from __future__ import annotations

from typing import Callable, Iterator

from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from .fsdp2 import finalize_fsdp2_grads


def forward_backward(model_chunks: list, forward_step: Callable, data_iterator: Iterator, num_microbatches: int,
                     tokens: int, micro_batch_size: int, pg_collection, forward_only: bool = False) -> list:
    """Run the step's micro-batches; returns the loss_func outputs of the last stage (else [])."""
    config = model_chunks[0].config
    # FSDP2 chunks reduce their gradients themselves and finish with their own cross-rank sums
    config.finalize_model_grads_func = finalize_fsdp2_grads if hasattr(model_chunks[0], "finalize_grads") \
        else finalize_model_grads
    config.no_sync_func = getattr(model_chunks[0], "no_sync", None) if len(model_chunks) == 1 else \
        [c.no_sync for c in model_chunks]
    config.grad_scale_func = None
    schedule = get_forward_backward_func()
    return schedule(
        forward_step_func=forward_step, data_iterator=data_iterator,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0], num_microbatches=num_microbatches,
        seq_length=tokens, micro_batch_size=micro_batch_size, forward_only=forward_only)

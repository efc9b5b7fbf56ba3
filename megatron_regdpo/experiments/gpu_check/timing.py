"""Timing on either device: device work is asynchronous, so a host clock is read only after a synchronize;
repeated measurements report the median after warm-up runs."""
from __future__ import annotations

import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device) -> float:
    """Wall time of one call of fn(), device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_seconds(fn, device, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn, device) for _ in range(iters))


def peak_bytes_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device) -> int | None:
    """The allocator's peak since the last reset (CUDA); None on the CPU, which has no such counter."""
    return torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None

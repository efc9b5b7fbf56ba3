"""Measure the per-sample squared-error sum against the memory-traffic floor (CLI: tools/bench_kernels.py).

Legend: N samples, M elements per sample, es bytes per element.
Floor (each input read once, each output written once):
    forward : read pred + target (2*N*M*es), write N float32 sums
    backward: read pred + target + g (2*N*M*es + 4N), write grad_pred (N*M*es)
Achieved GB/s = floor bytes / median time. On CUDA it is compared with a device copy of the forward's input
size (a copy reads and writes: 2 * bytes / time), the practical ceiling for a streaming kernel.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import torch

from kernels.sq_err.function import per_sample_sq_err_sum, resolve_backend


def machine() -> dict:
    info = {"node": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "loadavg_1m": os.getloadavg()[0]}  # other work on the machine skews CPU timings: record it
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _median_seconds(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_gbs(nbytes: int, device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_seconds(lambda: dst.copy_(src), device, warmup, iters) / 1e9


def floor_bytes(N: int, M: int, element_size: int) -> tuple[int, int]:
    fwd = 2 * N * M * element_size + 4 * N
    bwd = 2 * N * M * element_size + 4 * N + N * M * element_size
    return fwd, bwd


def bench_sq_err(N: int, M: int, dtype: torch.dtype, device: str | torch.device = "cpu",
                 backend: str = "auto", warmup: int = 2, iters: int = 5) -> dict:
    """One measurement: forward and backward median times, floor bytes and GB/s (plus copy ratio on CUDA)."""
    device = torch.device(device)
    pred = torch.randn(N, M, device=device).to(dtype).requires_grad_()
    target = torch.randn(N, M, device=device).to(dtype)
    g_N = torch.ones(N, device=device)

    def fwd():
        with torch.no_grad():
            per_sample_sq_err_sum(pred, target, backend)

    out_N = per_sample_sq_err_sum(pred, target, backend)
    bwd = lambda: torch.autograd.grad(out_N, pred, g_N, retain_graph=True)  # noqa: E731
    t_fwd = _median_seconds(fwd, device, warmup, iters)
    t_bwd = _median_seconds(bwd, device, warmup, iters)
    b_fwd, b_bwd = floor_bytes(N, M, pred.element_size())
    row = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "device": str(device), "impl": resolve_backend(pred, backend),
        "dtype": str(dtype).removeprefix("torch."), "N": N, "M": M,
        "fwd_ms": t_fwd * 1e3, "bwd_ms": t_bwd * 1e3, "fwd_bytes": b_fwd, "bwd_bytes": b_bwd,
        "fwd_gbs": b_fwd / t_fwd / 1e9, "bwd_gbs": b_bwd / t_bwd / 1e9,
        "fwdbwd_gbs": (b_fwd + b_bwd) / (t_fwd + t_bwd) / 1e9,
    }
    if device.type == "cuda":
        row["copy_gbs"] = copy_gbs(2 * N * M * pred.element_size(), device)
        row["fwd_vs_copy"] = row["fwd_gbs"] / row["copy_gbs"]
        row["bwd_vs_copy"] = row["bwd_gbs"] / row["copy_gbs"]
    return row


def format_table(rows: list[dict]) -> str:
    cols = ["impl", "dtype", "N", "M", "fwd_ms", "bwd_ms", "fwd_gbs", "bwd_gbs", "fwdbwd_gbs"]
    if any("copy_gbs" in r for r in rows):
        cols += ["copy_gbs", "fwd_vs_copy", "bwd_vs_copy"]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [cols] + [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)

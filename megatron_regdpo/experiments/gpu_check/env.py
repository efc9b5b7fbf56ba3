"""(a) The environment: the device, the versions that matter, and the two ceilings later steps are
measured against: a bf16 matrix product's TFLOP/s (random data, never zeros) and a device-to-device copy's
GB/s (bytes read plus written; experiments/kernels.py's copy, the one the kernel benchmark compares with)."""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import os
import platform

import torch

from megatron_regdpo.experiments.kernels import copy_gbs

from .timing import median_seconds


def matmul_tflops(device, n: int, dtype=torch.bfloat16, iters: int = 10) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t = median_seconds(lambda: torch.mm(a, b, out=c), device, warmup=3, iters=iters)
    return 2 * n**3 / t / 1e12


_DISTRIBUTIONS = {"megatron.core": "megatron-core"}


def _version(module: str) -> str | None:
    # the installed distribution's version: megatron-core 0.19's __version__ appends the short hash of
    # whatever git checkout its files sit in (ours, when the venv lives in the repository)
    try:
        return importlib.metadata.version(_DISTRIBUTIONS.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return str(getattr(importlib.import_module(module), "__version__", "unknown"))
    except ImportError:
        return None


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def describe_device(device) -> dict:
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(0)
        return {"device": p.name, "memory_gib": round(p.total_memory / 2**30, 2), "sms": p.multi_processor_count,
                "capability": f"{p.major}.{p.minor}", "cuda_runtime": torch.version.cuda}
    return {"device": f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"}


def run(ctx) -> dict:
    s = ctx.sizes
    out = describe_device(ctx.device)
    out.update(torch=torch.__version__, python=platform.python_version(),
               megatron_core=_version("megatron.core"), diffusers=_version("diffusers"), triton=_version("triton"),
               transformer_engine="present" if _present("transformer_engine") else "absent (skipped: cannot travel)",
               dali="present" if _present("nvidia.dali") else "absent (skipped: cannot travel)")
    out["matmul_n"] = s.matmul_n
    out["matmul_tflops"] = matmul_tflops(ctx.device, s.matmul_n, iters=s.timing_iters)
    out["copy_bytes"] = s.copy_bytes
    out["copy_gbs"] = copy_gbs(s.copy_bytes, torch.device(ctx.device), iters=s.timing_iters)
    bad = [k for k in ("matmul_tflops", "copy_gbs") if not (math.isfinite(out[k]) and out[k] > 0)]
    out["failures"] = [f"{k} = {out[k]} is not a positive number" for k in bad]
    return out


def summary(r: dict) -> str:
    return (f"{r['device']}, torch {r['torch']}, megatron-core {r['megatron_core']}: bf16 matmul "
            f"{r['matmul_tflops']:.4g} TFLOP/s, copy {r['copy_gbs']:.4g} GB/s")

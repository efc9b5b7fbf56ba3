"""The Wan block's fused CPU kernels: its fp32 elementwise steps (modulated LayerNorm, gated residual, q/k
RMSNorm + RoPE), each forward and backward one C++ pass over the data where torch's eager ops take several
passes and a Python call per op.

The Python code in models/wan/lean.py is their reference and their fallback: the kernels give its values op
for op (each product and sum rounded once, no fused multiply-add), except the order of the sums (statistics
and parameter gradients), so outputs agree to rounding and a recompute through the same kernel is bitwise its
forward (tests/unit/test_wan_cpu_kernels.py). GPU tensors never come here (there the steps are torch's
kernels, or TE's).

They are compiled on first use with torch's C++ extension builder (g++ and ninja; ~20 s on 2 cores) into
torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), for this machine's CPU
(-march=native: the library's name carries a digest of the CPU's feature flags and of the sources, so a cache
shared by machines of other CPUs builds its own copy, and an edited source a new one), and loaded from there afterwards (`make install` builds them once). Where that fails, or REGDPO_DISABLE_CPU_KERNELS=1, `ops()`
is None and `status()` says why: the block takes the Python path (one warning names the reason).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

DISABLE_ENV = "REGDPO_DISABLE_CPU_KERNELS"
NAME = "regdpo_wan_cpu"
SOURCES = ("ops.cpp", "norms.cpp", "rms_rope.cpp", "gelu.cpp")
HEADERS = ("common.h",)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict = {}


class _Ops:
    """The kernels' default overloads (a direct call, without the overload-resolution step)."""

    def __init__(self, ns):
        for name in ("layer_norm_forward", "layer_norm_backward", "gated_residual", "gated_residual_backward",
                     "rms_sumsq", "rms_apply", "rms_backward_dot", "rms_backward_dx", "rms_backward", "gelu_forward",
                     "gelu_backward"):
            setattr(self, name, getattr(ns, name).default)


def _library_name() -> str:
    """NAME plus a digest of what the library is built from: the sources and headers (torch's builder watches
    the sources only), the flags, torch's version (its headers and ABI) and the CPU's feature flags (what
    -march=native compiles for). The build directory is per Python version already."""
    here = Path(__file__).resolve().parent
    try:
        cpu = next((x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")), "")
    except OSError:
        cpu = ""
    digest = hashlib.sha1(" ".join([platform.machine(), cpu, torch.__version__, *CFLAGS, *LDFLAGS]).encode())
    for name in SOURCES + HEADERS:
        digest.update((here / name).read_bytes())
    return f"{NAME}_{digest.hexdigest()[:12]}"


def _build_dir(name: str) -> Path:
    """Where torch's extension builder puts this library by default (TORCH_EXTENSIONS_DIR respected)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / name


def _load(name: str) -> None:
    """Load the built library, building it first where it is not. Loading a built one takes its path
    directly (torch's builder would import setuptools and run ninja in every process: ~1 s each). Building
    holds a file lock that the OS releases if the builder dies, so a builder killed mid-way leaves neither a
    hung wait (torch's own lock file, which it then removes) nor a half-written library."""
    build = _build_dir(name)
    library = build / f"{name}.so"
    if library.exists() and not (build / "lock").exists():
        try:
            torch.ops.load_library(str(library))
            return
        except OSError:
            pass   # rebuilt below
    from torch.utils import cpp_extension

    build.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    with open(build / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)   # torch's lock file: stale, since no builder holds ours
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the builder's notes on compiler versions and ninja
            cpp_extension.load(name, [str(here / s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                               extra_include_paths=[str(here)], build_directory=str(build),
                               is_python_module=False, verbose=False)


def _build():
    if os.environ.get(DISABLE_ENV, "0").strip().lower() not in ("", "0", "false", "no"):
        return None, f"disabled by {DISABLE_ENV}"
    # torch.ops makes a namespace on any attribute access; an operator's attribute exists once registered
    if not hasattr(getattr(torch.ops, NAME), "rms_apply"):
        try:
            _load(_library_name())
        except Exception as e:  # noqa: BLE001 - the reason is the answer; the Python path still works
            lines = str(e).strip().splitlines()
            # the compiler's first error, not the command line the builder's message starts with
            line = next((x for x in lines if "error" in x.lower() and not x.startswith("[")), lines[-1] if lines else "")
            return None, f"building the CPU kernels failed ({type(e).__name__}: {line.strip()[:300]})"
    return _Ops(getattr(torch.ops, NAME)), "built and loaded"


def status() -> tuple[bool, str]:
    """(usable, reason): whether the fused CPU kernels are loaded, building them on the first call."""
    if "ops" not in _state:
        with _lock:
            if "ops" not in _state:
                _state["ops"], _state["reason"] = _build()
                if _state["ops"] is None and not _state["reason"].startswith("disabled"):
                    warnings.warn(f"Wan CPU kernels unavailable, using the Python path: {_state['reason']}",
                                  RuntimeWarning, stacklevel=2)
    return _state["ops"] is not None, _state["reason"]


def ops():
    """The loaded kernels (attributes named as the C++ operators), or None (see `status`)."""
    ops_ = _state.get("ops", False)
    if ops_ is False:
        status()
        ops_ = _state["ops"]
    return ops_

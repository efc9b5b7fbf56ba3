"""Can the Triton kernels run here? One answer with its reason, so logs say why a fallback was taken.

Usable means: not disabled by REGDPO_DISABLE_TRITON=1, triton importable, and either a CUDA device that
passes a one-time smoke launch, or a CPU tensor under the Triton interpreter (TRITON_INTERPRET=1, which must
be set before triton is first imported; tests run it in a subprocess). Triton compiles for GPUs only.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

DISABLE_ENV = "REGDPO_DISABLE_TRITON"


def _env_on(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def interpreter_on() -> bool:
    return _env_on("TRITON_INTERPRET")


@functools.lru_cache(maxsize=None)
def _cuda_smoke(device_index: int) -> tuple[bool, str]:
    """Compile and run the kernel once on a tiny input; a toolchain or arch problem shows up here."""
    from .sq_err.reference import sq_err_sum_reference

    try:
        from .sq_err.triton_kernels import sq_err_sum_fwd_triton

        x = torch.randn(2, 3000, device=f"cuda:{device_index}")
        y = torch.randn_like(x)
        ok = torch.allclose(sq_err_sum_fwd_triton(x, y), sq_err_sum_reference(x, y), rtol=1e-4)
    except Exception as e:  # noqa: BLE001 - the reason is the point of the probe
        return False, f"Triton smoke launch failed on cuda:{device_index}: {type(e).__name__}: {e}"
    if not ok:
        return False, f"Triton smoke launch on cuda:{device_index} disagreed with the torch reference"
    return True, f"Triton on {torch.cuda.get_device_name(device_index)}"


def triton_status(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(usable, reason) for tensors on `device` (default: cuda if available, else cpu)."""
    if _env_on(DISABLE_ENV):
        return False, f"disabled by {DISABLE_ENV}"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return _cuda_smoke(dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type == "cpu" and interpreter_on():
        return True, "Triton interpreter (TRITON_INTERPRET=1): CPU, slow, for tests only"
    return False, f"Triton compiles for GPUs only; tensors on {dev} use the torch reference"


def triton_usable(device: torch.device | str | None = None) -> bool:
    return triton_status(device)[0]

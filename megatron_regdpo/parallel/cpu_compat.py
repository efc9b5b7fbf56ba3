"""CPU compatibility for the few places where megatron-core assumes CUDA.

Applied by `init_distributed` only when CUDA is absent (never on a GPU machine: `apply()` returns
without touching anything there). Each patch names the megatron-core code it answers and is as
narrow as possible: it replaces one function, for one reason.
"""
from __future__ import annotations

import torch

_APPLIED: list[str] = []


def _patch_dist_ckpt_preload() -> None:
    # megatron/core/dist_checkpointing/strategies/filesystem_async.py, FileSystemWriterAsync.preload_tensors:
    # copies tensors to host with non_blocking=True, then calls torch.cuda.synchronize(), which raises
    # on a CPU-only torch. On CPU the copy is synchronous anyway, so ask for a blocking copy.
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.preload_tensors

    def preload_tensors(write_buckets, non_blocking=True):
        return original(write_buckets, non_blocking=False)

    FileSystemWriterAsync.preload_tensors = staticmethod(preload_tensors)
    _APPLIED.append("dist_checkpointing.preload_tensors: blocking host copy instead of cuda.synchronize")


class _CpuCuda:
    """torch.cuda as seen by one patched module: current_device() is the CPU, synchronize() a no-op."""

    def current_device(self):
        return "cpu"

    def synchronize(self, device=None):
        return None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchWithCpuCuda:
    cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


def _patch_dist_ckpt_finalize() -> None:
    # megatron/core/dist_checkpointing/strategies/state_dict_saver.py, save_state_dict_async_finalize:
    # broadcasts the failure flag in a tensor on device=torch.cuda.current_device(). The module sees
    # a torch whose cuda.current_device() is "cpu"; everything else is the real torch.
    from megatron.core.dist_checkpointing.strategies import state_dict_saver

    state_dict_saver.torch = _TorchWithCpuCuda()
    _APPLIED.append("dist_checkpointing.state_dict_saver: failure-flag broadcast on CPU")


def apply() -> list[str]:
    """Install the patches once, on CPU-only machines. Returns the list of active patches."""
    if torch.cuda.is_available() or _APPLIED:
        return list(_APPLIED)
    _patch_dist_ckpt_preload()
    _patch_dist_ckpt_finalize()
    return list(_APPLIED)


def active() -> list[str]:
    return list(_APPLIED)

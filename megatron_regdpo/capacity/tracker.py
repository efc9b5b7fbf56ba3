"""Live-tensor memory of one rank, by category, over a training step: real or fake tensors alike.

A TorchDispatchMode sees every op's outputs; each new storage is counted in the category of the phase it
was allocated in (weights, grads, optimizer, activations, reference) until the storage dies (weak
reference). So "activations" is everything the forward/backward allocated and had not freed: saved
tensors, temporaries, communication buffers. `peak` is the highest total, with the breakdown at that
moment; `phase_peaks` is the highest total seen while each phase was current.

Storages resized in place are followed while the tracker is active: FSDP2 (parallel/fsdp2.py) allocates
each parameter's unsharded all-gather buffer once and then frees and re-allocates it by resizing its storage
to 0 bytes and back (torch's fully_shard `free_storage`/`alloc_storage`), which no op reports. A storage
resized up from 0 counts in the category of the phase that re-allocates it (the reference's gathered layers
as reference, the policy's as activations). The all-gather's flat output and the reduce-scatter buffers are
ordinary op outputs.

Under FakeTensorMode nothing is allocated and data-dependent reads (`.item()`, `.tolist()`) have no value:
the tracker answers them with 1, or False for booleans (finite losses and norms, Adam step counts >= 1,
no inf found), which changes no shape.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary, weakref

CATEGORIES = ("weights", "grads", "optimizer", "activations", "reference")
HOST = "host"  # host memory (the cpu_swap reference, offloaded activations): tracked, never in the device total
_SCALAR_READS = {torch.ops.aten._local_scalar_dense.default}


def inner_tensors(t: torch.Tensor) -> list:
    """The tensors holding `t`'s memory: `t` itself, or a wrapper subclass's inner tensors (a DTensor's local
    shard; the wrapper's own storage is a data-less stand-in of the global size)."""
    if not is_traceable_wrapper_subclass(t):
        return [t]
    inner = (getattr(t, name) for name in t.__tensor_flatten__()[0])
    return [i for x in inner if isinstance(x, torch.Tensor) for i in inner_tensors(x)]


def _round_up(n: int, granule: int) -> int:
    return -(-n // granule) * granule if granule > 1 else n


class MemoryTracker(TorchDispatchMode):
    """`granule`: allocation rounding in bytes (512 = the CUDA caching allocator's block rounding);
    `device_type`: only storages on this kind of device count (a GPU run builds on the host first)."""

    def __init__(self, granule: int = 512, fake: bool = False, device_type: str = "cpu"):
        super().__init__()
        self.granule, self.fake, self.device_type = granule, fake, device_type
        self.category = "activations"
        self.phase = "setup"
        self.current = dict.fromkeys((*CATEGORIES, HOST), 0)
        self.peak = self.peak_overall = 0
        # host memory at its highest, and device + host at their highest together (one pool on a CPU)
        self.peak_host = self.peak_with_host = self.peak_with_host_overall = 0
        self.peak_breakdown = dict.fromkeys(CATEGORIES, 0)
        self.peak_phase = "setup"
        self.phase_peaks: dict[str, int] = {}
        self.phase_breakdowns: dict[str, dict] = {}   # by category, at each phase's peak
        self._seen = WeakIdKeyDictionary()

    @property
    def total(self) -> int:
        return sum(self.current[c] for c in CATEGORIES)

    @contextmanager
    def stage(self, phase: str, category: str):
        """New storages inside count as `category`; peaks inside are attributed to `phase`."""
        before = (self.phase, self.category)
        self.phase, self.category = phase, category
        if phase not in self.phase_peaks:
            self.phase_peaks[phase], self.phase_breakdowns[phase] = self.total, dict(self.current)
        try:
            yield self
        finally:
            self.phase, self.category = before

    def track(self, tensors, category: str | None = None) -> None:
        """Count tensors created outside the mode (e.g. before it was entered)."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self._add(t, category or self.category)

    def move(self, tensors, category: str) -> None:
        """Re-count already tracked tensors under another category (e.g. host copies made on the
        simulation's CPU device)."""
        for t in (i for leaf in tree_leaves(tensors) if isinstance(leaf, torch.Tensor) for i in inner_tensors(leaf)):
            record = self._seen.get(t.untyped_storage())
            if record is not None and record[0] != category:
                self.current[record[0]] -= record[1]
                self.current[category] += record[1]
                record[0] = category
                self._note_peak()

    def reset_peak(self) -> None:
        """Start the step's peak from now (the overall peak, `peak_overall`, is kept)."""
        self.peak, self.peak_breakdown, self.peak_phase = self.total, dict(self.current), self.phase
        self.phase_peaks, self.phase_breakdowns = {}, {}
        self.peak_host, self.peak_with_host = self.current[HOST], self.total + self.current[HOST]

    def _add(self, t: torch.Tensor, category: str) -> None:
        if is_traceable_wrapper_subclass(t):
            for inner in inner_tensors(t):
                self._add(inner, category)
            return
        if t.layout != torch.strided or t.device.type != self.device_type:
            return
        st = t.untyped_storage()
        if st in self._seen:
            return
        record = [category, _round_up(st.nbytes(), self.granule)]
        self._seen[st] = record
        weakref.finalize(st, self._release, record)
        self.current[category] += record[1]
        self._note_peak()

    def _note_peak(self) -> None:
        total, host = self.total, self.current[HOST]
        self.peak_host = max(self.peak_host, host)
        self.peak_with_host = max(self.peak_with_host, total + host)
        self.peak_with_host_overall = max(self.peak_with_host_overall, total + host)
        self.peak_overall = max(self.peak_overall, total)
        if total > self.peak:
            self.peak, self.peak_breakdown, self.peak_phase = total, dict(self.current), self.phase
        if total > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase], self.phase_breakdowns[self.phase] = total, dict(self.current)

    def _release(self, record: list) -> None:
        self.current[record[0]] -= record[1]

    def _resized(self, storage, nbytes: int) -> None:
        record = self._seen.get(storage)
        if record is None:
            return
        self.current[record[0]] -= record[1]
        if record[1] == 0 and nbytes:
            record[0] = self.category
        record[1] = _round_up(nbytes, self.granule)
        self.current[record[0]] += record[1]
        self._note_peak()

    def __enter__(self):
        real, tracker = torch.UntypedStorage.resize_, self

        def resize_(storage, nbytes):
            out = real(storage, nbytes)
            tracker._resized(storage, nbytes)
            return out

        self._real_resize, torch.UntypedStorage.resize_ = real, resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._real_resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake and func in _SCALAR_READS:
            return False if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t, self.category)
        return out

"""Reading the next step's pairs while this step computes: a dataset wrapper with one background thread.

The trainer asks for the next step's pair ids (`PairSampler.peek`: the sampler's position does not move, so a
checkpoint records the same state as without prefetching) once this step's micro-batches are built; the
thread reads them through the dataset while the step runs its reference pass, forward/backward and update
(zarr does the file reads and decompression on its own I/O threads, without the GIL; this thread waits for
them and assembles the tensors). `dataset[i]` then returns the item already read, or reads it now. The items
are the ones the dataset returns: the same bits either way.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence


class Prefetcher:
    """`dataset` with `prefetch(ids)`; everything else (len, shapes, store, ...) is the dataset's own."""

    def __init__(self, dataset):
        self.dataset = dataset
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pair-prefetch")
        self._pending: dict[int, Future] = {}

    def prefetch(self, ids: Sequence[int]) -> None:
        """Start reading `ids` (in order, one thread); ids already pending are not read twice, and pending ids
        not asked for again are dropped (their reads cancelled, or their results discarded)."""
        if self._pool is None:
            raise RuntimeError("Prefetcher.prefetch after close()")
        ids = list(ids)
        for stale in [i for i in self._pending if i not in ids]:
            self._pending.pop(stale).cancel()
        for i in ids:
            if i not in self._pending:
                self._pending[i] = self._pool.submit(self.dataset.__getitem__, i)

    def __getitem__(self, i: int) -> dict:
        future = self._pending.pop(i, None)
        return self.dataset[i] if future is None else future.result()  # a read's error is raised here, at use

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):   # only for names this class lacks
        if name == "dataset":          # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def settle(self) -> None:
        """Wait until no read is running (before a checkpoint save forks its writers); what was read is kept."""
        for future in list(self._pending.values()):
            future.exception()   # waits; an error stays in the future for the step that uses the item

    def close(self) -> None:
        """Drop what is pending (reads not started are cancelled) and end the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._pending = None, {}

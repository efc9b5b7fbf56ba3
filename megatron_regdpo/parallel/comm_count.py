"""Count the bytes handed to torch.distributed collectives, per operation and group size.

Convention (per rank, algorithm-independent): all_reduce/broadcast count their tensor; all_gather
counts the gathered (full) output; reduce_scatter counts the full input; point-to-point counts each
tensor sent or received. How many bytes actually cross a wire depends on the algorithm (ring:
about 2(n-1)/n of an all-reduce's tensor); the table in docs/benchmarks.md uses this convention.

The counter wraps every collective and its module-level aliases for the block (collective_wrap.py).
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch.distributed as dist

from .collective_wrap import P2P as _P2P
from .collective_wrap import wrapped_collectives


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _payload(op: str, a: dict) -> int:
    """Bytes of one call (bound arguments `a`) under the convention above."""
    if op in ("all_gather_into_tensor", "_all_gather_base"):
        return _nbytes(a["output_tensor"])
    if op in ("reduce_scatter_tensor", "_reduce_scatter_base"):
        return _nbytes(a["input"])
    if op == "all_gather":
        return sum(_nbytes(t) for t in a["tensor_list"])
    if op == "reduce_scatter":
        return sum(_nbytes(t) for t in a["input_list"])
    if op == "all_to_all_single":
        return _nbytes(a["input"])
    return _nbytes(a["tensor"])


class CommCounter:
    def __init__(self):
        self.bytes: dict[tuple[str, int], int] = defaultdict(int)
        self.calls: dict[tuple[str, int], int] = defaultdict(int)

    def record(self, op: str, nbytes: int, group) -> None:
        if op in _P2P:
            op, size = "p2p", 2
        else:
            size = dist.get_world_size(group) if group is not None else dist.get_world_size()
            if size == 1:
                return  # a group of one moves nothing
        self.bytes[(op, size)] += nbytes
        self.calls[(op, size)] += 1

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def summary(self) -> dict[str, int]:
        return {f"{op}@{size}": n for (op, size), n in sorted(self.bytes.items())}


@contextmanager
def count_collectives():
    """Within the block every collective is counted; yields the CommCounter."""
    counter = CommCounter()

    def wrap(op, fn, sig):
        def counted(*args, **kwargs):
            bound = sig.bind(*args, **kwargs).arguments
            counter.record(op, _payload(op, bound), bound.get("group"))
            return fn(*args, **kwargs)
        return counted

    with wrapped_collectives(wrap):
        yield counter

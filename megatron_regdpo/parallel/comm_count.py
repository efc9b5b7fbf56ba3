"""Count the bytes handed to torch.distributed collectives, per operation and group size.

Convention (per rank, algorithm-independent): all_reduce/broadcast count their tensor; all_gather
counts the gathered (full) output; reduce_scatter counts the full input; point-to-point counts each
tensor sent or received. How many bytes actually cross a wire depends on the algorithm (ring:
about 2(n-1)/n of an all-reduce's tensor); the table in docs/benchmarks.md uses this convention.

The counter replaces the torch.distributed functions and every module-level alias of them that a
loaded module holds (megatron-core binds `dist_all_gather_func = torch.distributed.all_gather_into_tensor`
at import), and restores all of them on exit.
"""
from __future__ import annotations

import inspect
import sys
from collections import defaultdict
from contextlib import contextmanager

import torch.distributed as dist

# batch_isend_irecv is not wrapped: it runs the isend/irecv of its P2POps, which are
_OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
        "send", "recv", "isend", "irecv", "all_to_all_single", "reduce_scatter",
        "_all_gather_base", "_reduce_scatter_base")
_P2P = ("send", "recv", "isend", "irecv")


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
    originals = {op: getattr(dist, op) for op in _OPS if hasattr(dist, op)}
    wrapped = {}
    for op, fn in originals.items():
        sig = inspect.signature(fn)

        def wrapper(*args, __op=op, __fn=fn, __sig=sig, **kwargs):
            bound = __sig.bind(*args, **kwargs).arguments
            counter.record(__op, _payload(__op, bound), bound.get("group"))
            return __fn(*args, **kwargs)
        wrapped[op] = wrapper
    aliases = []  # (module, attribute, original) for every module-level alias of a wrapped function
    by_id = {id(fn): op for op, fn in originals.items()}
    for module in list(sys.modules.values()):
        if module is None or module is dist:
            continue
        for attr, value in list(getattr(module, "__dict__", {}).items()):
            if callable(value) and id(value) in by_id:
                aliases.append((module, attr, value))
    try:
        for op, fn in wrapped.items():
            setattr(dist, op, fn)
        for module, attr, value in aliases:
            setattr(module, attr, wrapped[by_id[id(value)]])
        yield counter
    finally:
        for op, fn in originals.items():
            setattr(dist, op, fn)
        for module, attr, value in aliases:
            setattr(module, attr, value)

"""Wrap every torch.distributed collective for the duration of a block: counting (comm_count.py) and settling.

The wrapper replaces the torch.distributed functions and every module-level alias of them that a loaded
module holds (megatron-core binds `dist_all_gather_func = torch.distributed.all_gather_into_tensor` at
import), and restores all of them on exit.

`settled_collectives` serves memory measurement (the capacity planner's validation). A gloo collective
runs on the process group's worker thread, which drops its references to the call's tensors a moment
after the caller's `wait` returns (probed: after a synchronous `all_gather_into_tensor` of [160, 2, 256]
fp32 on two ranks, ~9% of 2,000 calls still had the input referenced; gloo's reduce-scatter also reduces a
copy of its input, which the worker frees). A temporary that the caller drops
right away (a gradient reduce-scattered in backward, an input made contiguous for the call) is then freed
either by the caller or, later, by the worker: which one is a race, so a measured peak could move by one
such buffer from run to run. Inside the block every collective runs synchronously and returns only once
no other thread references its tensors, so tensors die where the caller drops them, in every run.
Point-to-point calls (pipeline parallelism) are left as they are.
"""
from __future__ import annotations

import inspect
import sys
import time
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# batch_isend_irecv is not wrapped: it runs the isend/irecv of its P2POps, which are
OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
       "send", "recv", "isend", "irecv", "all_to_all_single", "reduce_scatter",
       "_all_gather_base", "_reduce_scatter_base")
P2P = ("send", "recv", "isend", "irecv")


@contextmanager
def wrapped_collectives(wrap):
    """Within the block each collective `fn` named in OPS is replaced by `wrap(op, fn, signature)`."""
    originals = {op: getattr(dist, op) for op in OPS if hasattr(dist, op)}
    wrapped = {op: wrap(op, fn, inspect.signature(fn)) for op, fn in originals.items()}
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
        yield
    finally:
        for op, fn in originals.items():
            setattr(dist, op, fn)
        for module, attr, value in aliases:
            setattr(module, attr, value)


class _Done:
    """The handle of a collective that already ran (an async call run synchronously)."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True


class _Fresh(TorchDispatchMode):
    """Weak references to the storages the ops inside create (a collective's own temporaries: gloo's
    reduce-scatter reduces a copy of its input, which its worker thread lets go of)."""

    def __init__(self):
        super().__init__()
        self.storages: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.storages.append(weakref.ref(t.untyped_storage()))
        return out


def _references(tensors: list, storages: list) -> list[int]:
    """How many references each tensor and each storage has (a worker may hold a view: a new tensor of
    the same storage)."""
    return [t._use_count() for t in tensors] + [torch._C._storage_Use_Count(s._cdata) for s in storages]


def _settled(tensors: list, storages: list, before: list[int], fresh: list) -> bool:
    """Whether no argument has more references than `before` and the call's temporaries are gone."""
    if any(n > m for n, m in zip(_references(tensors, storages), before)):
        return False
    mine = {s._cdata for s in storages}
    return all(ref() is None or ref()._cdata in mine for ref in fresh)


def _settle(tensors: list, storages: list, before: list[int], fresh: list, limit_s: float) -> bool:
    """Wait until the call's tensors are the caller's alone (another thread let go); False if they are
    not after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while not _settled(tensors, storages, before, fresh):
        if time.monotonic() > deadline:
            return False
        time.sleep(0)   # let the worker thread run
    return True


@contextmanager
def settled_collectives(limit_s: float = 1.0):
    """Within the block collectives run synchronously and return once their tensors are the caller's alone
    (see the module docstring). Yields a dict counting calls that did not settle within `limit_s`."""
    unsettled = {"calls": 0}

    def wrap(op, fn, sig):
        if op in P2P:   # left as they are: run synchronously, a pipeline's paired sends could deadlock
            return fn

        def settled(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            asked_async = bool(bound.arguments.pop("async_op", False))
            tensors = [t for t in tree_leaves(list(bound.arguments.values())) if isinstance(t, torch.Tensor)]
            storages = [t.untyped_storage() for t in tensors]
            before = _references(tensors, storages)
            with _Fresh() as fresh:
                work = fn(*bound.args, **bound.kwargs)
                if work is not None:
                    work.wait()
                    del work
            if not _settle(tensors, storages, before, fresh.storages, limit_s):
                unsettled["calls"] += 1
            return _Done() if asked_async else None
        return settled

    with wrapped_collectives(wrap):
        yield unsettled

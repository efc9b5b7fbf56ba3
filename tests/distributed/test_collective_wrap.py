"""settled_collectives (parallel/collective_wrap.py) on two gloo ranks: every collective returns with its
tensors referenced by the caller alone (no worker thread still holding one, nor a temporary of the call),
asynchronous calls run synchronously behind a completed handle, results are those of the plain calls, and
every function it replaced is restored on exit."""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatron_regdpo.parallel.spawn import run_world

pytestmark = pytest.mark.distributed
CALLS = 300


class _Created(TorchDispatchMode):
    """Weak references to the storages made by the ops inside (gloo's reduce-scatter reduces a copy)."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(t.untyped_storage()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _settling(rank, world, payload):
    from megatron_regdpo.parallel.collective_wrap import _Done, settled_collectives

    dist.init_process_group("gloo")
    originals = (dist.all_gather_into_tensor, dist.reduce_scatter_tensor, dist.all_reduce)
    held_after = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}
    wrong = temporaries_alive = temporaries = 0
    with settled_collectives() as unsettled:
        assert dist.all_gather_into_tensor is not originals[0]
        for i in range(CALLS):
            part = torch.full((160, 2, 64), float(rank + i))
            full = torch.empty(320, 2, 64)
            dist.all_gather_into_tensor(full, part)
            held_after["all_gather"] += part._use_count() > 1 or full._use_count() > 1
            wrong += not (torch.equal(full[:160], torch.full_like(part, i))
                          and torch.equal(full[160:], torch.full_like(part, 1 + i)))

            grad = torch.full((320, 2, 64), float(rank + 1))
            out = torch.empty(160, 2, 64)
            with _Created() as created:
                handle = dist.reduce_scatter_tensor(out, grad, async_op=True)
            assert isinstance(handle, _Done) and handle.wait() and handle.is_completed()
            mine = {out.untyped_storage()._cdata, grad.untyped_storage()._cdata}
            made = [ref() for ref in created.refs]
            temporaries += sum(1 for st in made if st is None or st._cdata not in mine)
            temporaries_alive += sum(1 for st in made if st is not None and st._cdata not in mine)
            del made
            held_after["reduce_scatter"] += grad._use_count() > 1 or out._use_count() > 1
            wrong += not torch.equal(out, torch.full_like(out, 3.0))

            stat = torch.full((320, 2, 1), float(rank))
            assert dist.all_reduce(stat) is None
            held_after["all_reduce"] += stat._use_count() > 1
            wrong += not torch.equal(stat, torch.ones_like(stat))
    restored = (dist.all_gather_into_tensor, dist.reduce_scatter_tensor, dist.all_reduce) == originals
    dist.destroy_process_group()
    return {"held_after": held_after, "wrong": wrong, "unsettled": unsettled["calls"], "restored": restored,
            "temporaries": temporaries, "temporaries_alive": temporaries_alive}


def test_settled_collectives_leave_their_tensors_to_the_caller():
    for r in run_world(2, _settling, None):
        assert r["held_after"] == {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}, r
        assert r["wrong"] == 0 and r["unsettled"] == 0 and r["restored"], r
        assert r["temporaries_alive"] == 0, r   # the call's own copies died before it returned

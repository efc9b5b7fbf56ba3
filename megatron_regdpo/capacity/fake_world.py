"""One rank of a large world, simulated in this process: torch's fake process group + FakeTensorMode.

Collectives move no data and tensors have no storage, so a 14B model at any layout runs its real code
(megatron-core layers, schedules, DDP, optimizer; FSDP2's fully_shard, its all-gathers and reduce-scatters,
the AdamW over its DTensor shards) on a CPU machine in seconds. Five narrow adjustments, each active only
inside `fake_world`:

- object collectives (`all_gather_object`, used by megatron-core's optimizer to compare parameter keys
  across ranks) pickle through tensor data, which fake tensors lack: every rank answers with this rank's
  object, which is right for the identical ranks of a model-parallel layout;
- megatron-core's DDP batches its bucket all-reduces in torch's `_coalescing_manager`, whose coalesced op
  has no fake implementation: inside the fake world each bucket's collective runs on its own (they
  allocate nothing either way);
- megatron-core's fallback gradient norm (no apex/TE here) builds `torch.tensor(list of norms)`, which
  needs data: inside the fake world the norms are stacked instead (same one-element result);
- FSDP2 (parallel/fsdp2.py) builds its DeviceMesh over megatron's dp_cp group with
  `DeviceMesh.from_group`, which makes the mesh's rank tensor and finds this rank's coordinate in it with a
  data-dependent op (`nonzero`) that fake tensors cannot answer: the mesh (a few integers, no model memory)
  is built on real tensors. Everything FSDP2 does after that runs on fake tensors: `fully_shard` splits
  the fake parameters, its all-gather/reduce-scatter buffers are fake outputs of the fake group's
  collectives (the tracker counts them, capacity/tracker.py);
- FakeTensorMode memoises every output by a weak reference, and `nn.Module.to()` refuses to swap a
  tensor with weak references (which build_wan's cast needs): outputs of fake ops are not memoised
  (only conversions of real constants are, which is what the memo is for).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh


def _gather_own_object(object_list, obj, group=None):
    object_list[:] = [obj] * len(object_list)


def _l2_norm_stacked(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    norms = [t.float().norm() for tensors in tensor_lists for t in tensors]
    return torch.stack(norms).norm().reshape(1), None


def _mesh_from_real_tensors(from_group):
    def build(*args, **kwargs):
        with unset_fake_temporarily():
            return from_group(*args, **kwargs)
    return staticmethod(build)


@contextmanager
def _each_op_alone(group=None, device=None, async_ops=False):
    yield None


def fake_tensor_mode() -> FakeTensorMode:
    # real tensors reaching an op become fake constants: megatron's RNG tracker compares the CPU RNG state
    # (a real tensor, torch.get_rng_state() is not an op) before and after every fork
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    converter = mode.fake_tensor_converter
    memoise = converter.set_tensor_memo

    def set_tensor_memo(t, v):
        if t.device.type != "meta":  # a real tensor converted to fake (constants): keep the memo
            memoise(t, v)

    converter.set_tensor_memo = set_tensor_memo
    return mode


@contextmanager
def fake_world(parallel, world_size: int, rank: int = 0, seed: int = 1234):
    """Process groups of `parallel` (our config section) for `rank` of `world_size`, fake; yields them.
    Tensors created inside must be created under `fake_tensor_mode()` (the caller enters it)."""
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import clip_grads

    from megatron_regdpo.parallel.groups import destroy_distributed, init_distributed

    if dist.is_initialized():
        raise RuntimeError("fake_world needs a process without torch.distributed initialised")
    # its RNG tracker compares CPU RNG states around each fork; fake comparisons read as "changed"
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
    saved = (dist.all_gather_object, param_and_grad_buffer._coalescing_manager, clip_grads.l2_norm_impl,
             DeviceMesh.__dict__["from_group"])
    dist.all_gather_object, param_and_grad_buffer._coalescing_manager, clip_grads.l2_norm_impl = \
        _gather_own_object, _each_op_alone, _l2_norm_stacked
    DeviceMesh.from_group = _mesh_from_real_tensors(saved[3].__func__)
    try:
        yield init_distributed(parallel.tp, parallel.pp, parallel.cp, rank=rank, world_size=world_size,
                               backend="fake", seed=seed)
    finally:
        dist.all_gather_object, param_and_grad_buffer._coalescing_manager, clip_grads.l2_norm_impl = saved[:3]
        DeviceMesh.from_group = saved[3]
        destroy_distributed()


def maybe_fake(fake: bool):
    """FakeTensorMode when simulating, nothing when measuring real tensors."""
    return fake_tensor_mode() if fake else nullcontext()


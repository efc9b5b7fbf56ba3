"""CPU compatibility for the places where megatron-core assumes CUDA.

Applied by `init_distributed` only when CUDA is absent (on a GPU machine `apply()` returns without
touching anything). Two mechanisms, both narrow:

1. Module lenses: in a listed megatron-core module, the global name `torch` is replaced by a view of
   torch in which `torch.cuda.current_device()` is the CPU, the CUDA RNG calls use the CPU generator,
   `torch.cuda.synchronize()` is a no-op and factory functions given device="cuda" allocate on the CPU.
   Every other attribute is the real torch. Each entry names the code it answers.
2. Function replacements, each documented at its definition.
"""
from __future__ import annotations

import importlib
import inspect
import textwrap

import torch

_APPLIED: list[str] = []
_RECOMPILED: set = set()  # functions made by _recompiled (their source cannot be read again)

# module -> the CUDA assumptions in it that CPU runs hit (megatron-core 0.16.1 through 0.19.2)
LENSED_MODULES = {
    "megatron.core.tensor_parallel.mappings":
        "_gather_along_first_dim/_reduce_scatter_along_first_dim allocate on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.layers":
        "sequence-parallel all-gather buffers in linear_with_grad_accumulation_and_async_allreduce",
    "megatron.core.tensor_parallel.random":
        "CudaRNGStatesTracker.add/fork and CheckpointFunction use torch.cuda.{get,set}_rng_state/manual_seed",
    "megatron.core.utils":
        "GlobalMemoryBuffer.get_tensor allocates on torch.cuda.current_device()",
    "megatron.core.pipeline_parallel.schedules":
        "total_num_tokens = torch.zeros([], dtype=torch.int, device='cuda') in every schedule",
    "megatron.core.pipeline_parallel.p2p_communication":
        "tensor-shape exchange and receive buffers on torch.cuda.current_device()",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver":
        "save_state_dict_async_finalize broadcasts a failure flag on torch.cuda.current_device()",
    "megatron.core.dist_checkpointing.strategies.filesystem_async":
        "FileSystemWriterAsync.preload_tensors calls torch.cuda.synchronize()",
    "megatron.core.distributed.param_and_grad_buffer":
        "grad/param buffers allocated on torch.cuda.current_device(); from 0.19 start_grad_sync waits "
        "on torch.cuda.current_stream() for CUDA-graph gradient events",
    "megatron.core.distributed.distributed_data_parallel":
        "torch.cuda.synchronize/empty_cache around buffer (re)allocation",
    "megatron.core.optimizer.optimizer":
        "found_inf/_scale tensors created with device='cuda'",
    "megatron.core.optimizer.distrib_optimizer":
        "shard buffers allocated on torch.cuda.current_device()",
    "megatron.core.optimizer.clip_grads":
        "grad-norm reduction tensors created with device='cuda'",
}

# methods that call Tensor.cuda(), which no module lens reaches: recompiled with `<name>.cuda()` replaced by
# `<name>.to(torch.cuda.current_device())`, the CPU through their module's lens (the module must be lensed)
CUDA_CALLS = {
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.get_parameter_state_dp_zero":
        ("send_tensor", "gathering the state for a fully_reshardable optimizer checkpoint moves each send buffer "
                        "to CUDA before the all-gather"),
}

# modules whose functions compare tensor type names against the CUDA ones ('torch.cuda.FloatTensor')
TYPE_NAME_MODULES = {
    "megatron.core.optimizer.optimizer": "Float16OptimizerWithFloat16Params.__init__ sorts params by type name",
    "megatron.core.optimizer.distrib_optimizer": "DistributedOptimizer builds its param groups by type name",
    "megatron.core.optimizer.clip_grads": "clip_grad_by_total_norm_fp32 asserts 'torch.cuda.FloatTensor' grads",
}


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


class _CpuStream:
    """The CPU's one stream: every operation has completed when it returns, so waits are no-ops."""

    def wait_event(self, event):
        return None

    def wait_stream(self, stream):
        return None

    def synchronize(self):
        return None


class _CpuCuda:
    """torch.cuda as seen through the lens."""

    def current_device(self):
        return "cpu"

    def current_stream(self, device=None):
        return _CpuStream()

    def default_stream(self, device=None):
        return _CpuStream()

    def synchronize(self, device=None):
        return None

    def get_rng_state(self, device=None):
        return torch.get_rng_state()

    def set_rng_state(self, state, device=None):
        torch.set_rng_state(state)

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchLens:
    cuda = _CpuCuda()
    _FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "randn", "rand")

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in self._FACTORIES:
            def factory(*args, device=None, pin_memory=False, **kwargs):
                return value(*args, device=_cpu_device(device), **kwargs)
            return factory
        return value


def _lens_modules() -> None:
    lens = _TorchLens()
    for name, why in LENSED_MODULES.items():
        module = importlib.import_module(name)
        module.torch = lens
        _APPLIED.append(f"{name}: {why}")


_CUDA_TYPE_NAMES = {f"'torch.cuda.{t}Tensor'": f"'torch.{t}Tensor'" for t in ("Float", "Half", "BFloat16")}


def _recompiled(fn, module, owner, replacements: dict):
    """`fn` recompiled from its source with each key of `replacements` replaced by its value.

    A method's zero-argument super() needs the class cell of its original definition, which a
    recompiled function lacks, so it is spelled out as super(<owner>, self)."""
    src = textwrap.dedent(inspect.getsource(fn))
    if inspect.isclass(owner):
        src = src.replace("super()", f"super({owner.__name__}, self)")
    for old, new in replacements.items():
        src = src.replace(old, new)
    src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith("@"))
    namespace: dict = {}
    exec(compile(src, inspect.getsourcefile(fn), "exec"), module.__dict__, namespace)
    new = namespace[fn.__name__]
    new.__qualname__ = fn.__qualname__
    _RECOMPILED.add(new)
    return new


def _patch_tensor_type_names() -> None:
    # The functions named in TYPE_NAME_MODULES decide how to treat a parameter by comparing
    # `tensor.type()` with 'torch.cuda.FloatTensor' and friends; CPU tensors are 'torch.FloatTensor'.
    # Each such function (module level or method) is recompiled with the CPU names; nothing else changes.
    for name, why in TYPE_NAME_MODULES.items():
        module = importlib.import_module(name)
        owners = [module] + [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == name]
        count = 0
        for owner in owners:
            for attr, raw in list(vars(owner).items()):
                fn = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
                if not inspect.isfunction(fn) or fn.__module__ != name:
                    continue
                if not any(t in inspect.getsource(fn) for t in _CUDA_TYPE_NAMES):
                    continue
                new = _recompiled(fn, module, owner, _CUDA_TYPE_NAMES)
                setattr(owner, attr, type(raw)(new) if isinstance(raw, (staticmethod, classmethod)) else new)
                count += 1
        _APPLIED.append(f"{name}: {why} ({count} function(s) use CPU type names)")


def _patch_cuda_calls() -> None:
    # A function recompiled by _patch_tensor_type_names has no source of its own to read again: a listed
    # method must not also compare type names (were it to, both replacements would go into one recompile).
    for target, (name, why) in CUDA_CALLS.items():
        module_name, qualname = target.split(":")
        module = importlib.import_module(module_name)
        assert module_name in LENSED_MODULES, module_name
        owner_name, attr = qualname.split(".")
        owner = getattr(module, owner_name)
        fn = vars(owner)[attr]
        assert fn not in _RECOMPILED, target
        call = f"{name}.cuda()"
        if call not in inspect.getsource(fn):  # a megatron-core version without the call: nothing to answer
            continue
        setattr(owner, attr, _recompiled(fn, module, owner, {call: f"{name}.to(torch.cuda.current_device())"}))
        _APPLIED.append(f"{module_name}: {qualname}: {why}")


def _patch_rng_state_helpers() -> None:
    # megatron/core/tensor_parallel/random.py: _get_cuda_rng_state/_set_cuda_rng_state index
    # torch.cuda.default_generators and call _C._cuda_setRNGState; on CPU the tracker's states are
    # the CPU generator's.
    from megatron.core.tensor_parallel import random

    random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    _APPLIED.append("megatron.core.tensor_parallel.random: _get/_set_cuda_rng_state use the CPU generator")


def apply() -> list[str]:
    """Install the patches once, on CPU-only machines. Returns the list of active patches."""
    if torch.cuda.is_available() or _APPLIED:
        return list(_APPLIED)
    _lens_modules()
    _patch_tensor_type_names()
    _patch_cuda_calls()
    _patch_rng_state_helpers()
    return list(_APPLIED)


def active() -> list[str]:
    return list(_APPLIED)

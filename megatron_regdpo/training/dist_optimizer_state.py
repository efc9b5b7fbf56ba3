"""Checkpointing megatron-core's DistributedOptimizer when torch's Adam/AdamW runs inside it.

Without Transformer Engine or Apex (CPU, or a GPU machine without them) megatron-core 0.16-0.19 builds
its DistributedOptimizer around torch.optim.AdamW, which keeps `step` as a tensor in each parameter's
state (TE/Apex FusedAdam keep it in the param group). megatron's checkpoint path for that case has three
faults, each worked around here for the duration of one `sharded_state_dict` or `load_state_dict` call:

(a) `state_dict()` reads the step from the inner optimizer's per-parameter state and asserts there is
    exactly one value; torch creates that state lazily at the first step, so a save before any step, and
    every load into a fresh optimizer (`sharded_state_dict(is_loading=True)` calls `state_dict()` first),
    fail. megatron's own remedy, `_init_optimizer_states_with_dummy_values`, takes a real step with zero
    gradients, which moves the weights through AdamW's weight decay. We create the state torch's first
    step would create (step 0, zero moments) instead: the next step is then the same as without it.
(b) `_set_main_param_and_optimizer_states` copies every tensor of a parameter's state from the checkpoint,
    `step` included, which the `fully_reshardable` checkpoint does not hold (KeyError; megatron sets the
    step from the param group's value just before). In `dp_reshardable` loading it also copies into the
    fp32 main parameter, a view of a leaf parameter that requires grad, outside no_grad (RuntimeError).
    During a load it runs under no_grad and keeps each parameter's own step tensor.
(c) `load_state_dict` gives every parameter's state the SAME step tensor; torch's AdamW increments each
    parameter's step in place, so after a load the step advanced once per parameter per step (wrong bias
    correction from the first step after a resume on). Every parameter gets its own copy afterwards.

(d), megatron calling `.cuda()` while gathering the state for a save, is a CPU matter: cpu_compat.

The sharding type is `fully_reshardable`: the checkpoint holds each parameter's fp32 main copy and
moments in the parameter's own shape and sharding (the model's keys), so a run resumes under another
TP/PP/DP layout, as the model's weights do. `dp_reshardable` avoids gathering the state (each rank writes
its own slice) but only reshards along DP (the bucket layout must match). The price of fully_reshardable
is memory at save and load: each DP rank holds its model-parallel shard's full fp32 state in CPU memory
(12 bytes per parameter of the shard) for the duration of the call.
"""
from __future__ import annotations

import contextlib

import torch

SHARDING_TYPE = "fully_reshardable"


def leaves(optimizer) -> list:
    """The optimizers inside a megatron ChainedOptimizer, or [optimizer]."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_distributed(leaf) -> bool:
    """megatron-core's DistributedOptimizer (its checkpoints hold its own layout)."""
    return _reshardable(leaf)


def _reshardable(leaf) -> bool:
    """megatron's DistributedOptimizer (any version that names its reshardable formats)."""
    return SHARDING_TYPE in getattr(leaf, "checkpoint_fully_reshardable_formats", ())


def _torch_adam_inside(leaf) -> bool:
    """A DistributedOptimizer whose inner optimizer keeps a per-parameter `step` tensor (torch Adam/AdamW)."""
    return (_reshardable(leaf) and not getattr(leaf, "is_stub_optimizer", False)
            and isinstance(getattr(leaf, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))
            and hasattr(leaf, "model_param_group_index_map"))


def sharded_state_kwargs(optimizer) -> dict:
    """Extra arguments of `optimizer.sharded_state_dict`: the sharding type where a leaf takes one."""
    if any(_reshardable(leaf) for leaf in leaves(optimizer)):
        return {"metadata": {"distrib_optim_sharding_type": SHARDING_TYPE}}
    return {}


def _init_state(adam: torch.optim.Optimizer) -> None:
    """(a): the state torch's Adam/AdamW creates at its first step (non-fused, non-capturable path)."""
    for group in adam.param_groups:
        for p in group["params"]:
            state = adam.state[p]
            if state:
                continue
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _untie_steps(adam: torch.optim.Optimizer) -> None:
    """(c): one step tensor per parameter (megatron's load_state_dict shares one among all)."""
    for state in adam.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].detach().clone()


def _set_states_keeping_step(leaf, original):
    """(b): megatron's setter under no_grad, with each parameter's `step` left as it is."""
    def set_states(model_param, tensors):
        group_index, group_order = leaf.model_param_group_index_map[model_param]
        main_param = leaf.optimizer.param_groups[group_index]["params"][group_order]
        own = leaf.optimizer.state[main_param]
        tensors = dict(tensors)
        if "step" in own:
            tensors["step"] = own["step"]  # a copy onto itself: megatron set it from the param group already
        with torch.no_grad():
            original(model_param, tensors)
    return set_states


@contextlib.contextmanager
def torch_adam_checkpoint_fixes(optimizer):
    """Around one `sharded_state_dict` or `load_state_dict` call of `optimizer` (chained or not): fixes
    (a)-(c) on every DistributedOptimizer leaf with torch Adam inside; other leaves are left alone."""
    fixed = [leaf for leaf in leaves(optimizer) if _torch_adam_inside(leaf)]
    for leaf in fixed:
        _init_state(leaf.optimizer)
        leaf._set_main_param_and_optimizer_states = _set_states_keeping_step(
            leaf, leaf._set_main_param_and_optimizer_states)
    try:
        yield
    finally:
        for leaf in fixed:
            del leaf._set_main_param_and_optimizer_states  # the class's method again
            _untie_steps(leaf.optimizer)

"""AdamW through megatron-core's optimizer (distributed or not), the LR schedule, and a step that
skips non-finite updates instead of applying them."""
from __future__ import annotations

import math

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import clip_grads  # looked up at call time: cpu_compat may rebind it

from .dist_optimizer_state import is_distributed, leaves, sharded_state_kwargs, torch_adam_checkpoint_fixes


def build_optimizer(optim, parallel, params_dtype: torch.dtype, model_chunks: list, pg_collection):
    """`optim`/`parallel`: our config sections. Only parameters with requires_grad are optimised (LoRA).
    FSDP2 chunks get AdamW over their shards (fsdp2_optimizer.py), everything else megatron-core's."""
    if parallel.fsdp:
        from .fsdp2_optimizer import FSDP2AdamW

        (chunk,) = model_chunks
        return FSDP2AdamW(chunk, optim)
    config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay, adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1], adam_eps=optim.eps, clip_grad=optim.clip_grad,
        bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
        use_distributed_optimizer=parallel.distributed_optimizer)
    return get_megatron_optimizer(config, model_chunks, use_gloo_process_groups=False)


def optimizer_checkpoint_state(optimizer, model_sharded_state: dict, is_loading: bool) -> dict:
    """The optimizer's part of a training checkpoint (dist_checkpointing sharded objects), from its own
    `sharded_state_dict`. A distributed optimizer is asked for a layout that reshards on load, and megatron's
    faults on its torch-Adam path are worked around (dist_optimizer_state.py); any other optimizer as is."""
    with torch_adam_checkpoint_fixes(optimizer):
        return optimizer.sharded_state_dict(model_sharded_state, is_loading=is_loading,
                                            **sharded_state_kwargs(optimizer))


def optimizer_layout(optimizer) -> str:
    """How a checkpoint holds this optimizer's state: megatron-core's distributed optimizer has a layout of its
    own ("distributed"); megatron's other optimizers and FSDP2's AdamW share one ("per_parameter")."""
    return "distributed" if any(is_distributed(leaf) for leaf in leaves(optimizer)) else "per_parameter"


def load_optimizer_checkpoint_state(optimizer, loaded: dict) -> None:
    """`loaded`: what dist_checkpointing read for `optimizer_checkpoint_state(..., is_loading=True)`."""
    _hyperparameters_of_this_run(optimizer, loaded)
    with torch_adam_checkpoint_fixes(optimizer):
        optimizer.load_state_dict(loaded)


def _hyperparameters_of_this_run(optimizer, loaded: dict) -> None:
    """State from the checkpoint, hyperparameters from the recipe: the saved parameter groups of a
    (non-distributed) megatron-core optimizer are replaced by this run's. megatron matches saved groups to
    its own by hyperparameter keys that change between versions (0.19 adds max_lr, min_lr, start_wd, ...)
    and that a checkpoint written with FSDP2 does not hold; lr and weight decay are set every step anyway."""
    (leaf, *more) = leaves(optimizer)
    holder = loaded.get("optimizer", loaded) if isinstance(loaded, dict) else None
    saved = holder.get("param_groups") if isinstance(holder, dict) else None
    current = getattr(leaf, "param_groups", None)
    if more or is_distributed(leaf) or not isinstance(saved, list) or current is None or len(saved) != len(current):
        return
    holder["param_groups"] = [{**{k: v for k, v in mine.items() if k != "params"},
                               "params": theirs.get("params", mine["params"])} for mine, theirs in zip(current, saved)]


def lr_at(step: int, optim, schedule) -> float:
    """Linear warmup over `warmup_steps`, then constant or cosine decay to `min_lr` at `train_steps`."""
    if schedule.warmup_steps and step < schedule.warmup_steps:
        return optim.lr * (step + 1) / schedule.warmup_steps
    if schedule.lr_decay == "constant":
        return optim.lr
    span = max(schedule.train_steps - schedule.warmup_steps, 1)
    progress = min((step - schedule.warmup_steps) / span, 1.0)
    return schedule.min_lr + 0.5 * (optim.lr - schedule.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float, weight_decay: float) -> None:
    """The step's learning rate and weight decay on every parameter group. megatron-core's groups carry
    `wd_mult` (0 for biases and 1-D parameters), which its own scheduler applies: applied here too (without
    it torch's AdamW would decay every parameter at the optimizer's default)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def optimizer_step(optimizer, loss: float, clip_grad: float) -> tuple[bool, float]:
    """Clip and apply the update; returns (applied, grad_norm). A non-finite loss or gradient norm
    (or a found-inf from loss scaling) applies nothing: the caller counts the skip."""
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(grad_norm) or not math.isfinite(loss):
        optimizer.zero_grad()
        return False, grad_norm
    if clip_grad > 0 and hasattr(optimizer, "clip_grads"):  # FSDP2: gradients are shards
        optimizer.clip_grads(clip_grad, grad_norm)
    elif clip_grad > 0:
        for leaf in leaves(optimizer):
            params = leaf.get_parameters()
            if params:
                clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=clip_grad, total_norm=grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm

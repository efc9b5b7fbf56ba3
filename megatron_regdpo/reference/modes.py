"""The four reference modes (objective.reference.mode) and `build_reference`, which picks one.

- lora_base: the policy with its adapters switched off. No copy, no I/O: the paper's recommendation with LoRA.
- resident:  a frozen copy of the base model in the policy's layout (same TP/CP/PP shards) on the device;
             requires_grad False everywhere, so DDP and the optimizer never see it (no grads, no states).
- cpu_swap:  the same copy, but its weights live in host memory (pinned with CUDA) and are copied to the
             device once per step, in `begin_step`, for all the step's micro-batches, and dropped in
             `end_step`. I/O: `io_bytes_per_step` = this rank's reference shard, host->device only (the weights
             are frozen, nothing is copied back). Wan2.1-14B in bf16 is ~28.6 GB / (TP*PP) per rank per step:
             ~1.1 s at 25 GB/s of pinned PCIe 5 bandwidth, against the paper's ~1 min per batch of offloading.
             Peak device memory during the reference pass is policy + reference weights + one no-grad forward;
             the policy's activations, gradients and optimizer step come after `end_step`.
- cached:    errors precomputed offline (tools/precompute_reference.py) and looked up by key (cache.py).

Under pipeline parallelism (lora_base, resident, cpu_swap) each rank runs its stage's layers in a forward-only
pass through the schedule (base.py `stage`, `stage_forward_step`): lora_base the policy's stage with its
adapters off, resident and cpu_swap the frozen copy's stage (this stage's layers only, swapped in per step).

The reference of DPO is the model training STARTS from. With LoRA that is always the base (adapters off),
whatever the step. Without LoRA, copying the policy is right only before its first update: a resumed
full fine-tuning run passes `checkpoint=` (the base model's distributed checkpoint) instead.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from megatron_regdpo.models.lora import base_state_dict, has_lora, lora_disabled

from .base import ReferenceBatch, ReferenceErrors, model_errors, unwrap
from .cache import ReferenceCache

MODES = ("lora_base", "resident", "cpu_swap", "cached")


class LoraBaseReference(ReferenceErrors):
    mode = "lora_base"

    def __init__(self, policy: torch.nn.Module, cp_group=None):
        self.policy = unwrap(policy)
        if not has_lora(self.policy):
            raise ValueError("objective.reference.mode='lora_base' needs a LoRA policy (lora.rank > 0)")
        self.cp_group = cp_group
        self.stage = policy  # as wrapped: the schedule runs the chunk the policy pass runs

    def _errors(self, batch: ReferenceBatch) -> torch.Tensor:
        with lora_disabled(self.policy):
            return model_errors(self.policy, batch, self.cp_group)

    def stage_context(self):
        return lora_disabled(self.policy)


class ResidentReference(ReferenceErrors):
    mode = "resident"

    def __init__(self, model: torch.nn.Module, cp_group=None):
        self.model, self.cp_group = model, cp_group
        self.stage = model

    def _errors(self, batch: ReferenceBatch) -> torch.Tensor:
        return model_errors(self.model, batch, self.cp_group)


class CpuSwapReference(ResidentReference):
    mode = "cpu_swap"

    def __init__(self, model: torch.nn.Module, cp_group=None):
        super().__init__(model, cp_group)
        self._params = list(model.parameters())
        self.device = self._params[0].device
        pin = torch.cuda.is_available()
        # host copies first, then the device storage is released: the model keeps its parameter objects
        # (and their shapes in `_shapes`) with empty data until begin_step
        self._host = [p.detach().to("cpu", copy=True).pin_memory() if pin else p.detach().to("cpu", copy=True)
                      for p in self._params]
        self.io_bytes_per_step = sum(h.numel() * h.element_size() for h in self._host)
        self.swapped_in = True
        self.end_step()

    @property
    def host_copies(self) -> list:
        """The weights' host-memory copies (what the capacity planner counts as host memory)."""
        return self._host

    def begin_step(self) -> None:
        if not self.swapped_in:
            for p, h in zip(self._params, self._host):
                p.data = h.to(self.device, non_blocking=True, copy=True)
            self.swapped_in = True

    def end_step(self) -> None:
        if self.swapped_in:
            for p in self._params:
                p.data = torch.empty(0, dtype=p.dtype, device=self.device)
            self.swapped_in = False

    def _errors(self, batch: ReferenceBatch) -> torch.Tensor:
        self._check_swapped_in()
        return super()._errors(batch)

    def stage_context(self):
        self._check_swapped_in()
        return super().stage_context()

    def _check_swapped_in(self) -> None:
        if not self.swapped_in:
            raise RuntimeError("cpu_swap reference: call begin_step() before the step's reference forwards "
                               "(and end_step() after them)")


class CachedReference(ReferenceErrors):
    mode = "cached"

    def __init__(self, cache: ReferenceCache):
        self.cache = cache

    def noise_key(self, step: int, epoch: int) -> tuple[int, int]:
        return self.cache.attrs["step"], epoch

    def __call__(self, batch: ReferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        w, l = self.cache.lookup(batch.pair_ids, seed=batch.seed, step=batch.step, draw=batch.draw)
        return w.to(batch.target.device), l.to(batch.target.device)


def frozen_reference_model(build_model: Callable[[], torch.nn.Module], policy: torch.nn.Module | None = None,
                           checkpoint=None, shard: Callable | None = None) -> torch.nn.Module:
    """A base model (no adapters) in the policy's layout with the reference weights, frozen, in eval mode.
    `shard` (FSDP2 policies): shards the frozen model like the policy before its weights are loaded, so
    each rank holds and reads only its shard."""
    from megatron_regdpo.checkpoint_io.fsdp2_shards import copy_into_shards, is_sharded
    from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model

    model = build_model()
    if has_lora(model):
        raise ValueError("build_model must build the base model, without LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    if shard is not None:
        model = shard(model)
    if checkpoint is not None:
        load_model(model, checkpoint)
    elif policy is not None:
        base = base_state_dict(unwrap(policy))
        if is_sharded(model):  # the same mesh and shapes as the policy: shard for shard
            copy_into_shards(model, {k: v.to_local() if hasattr(v, "to_local") else v for k, v in base.items()})
        else:
            with torch.no_grad():
                model.load_state_dict(base, strict=True)
    else:
        raise ValueError("the reference weights come from `policy` (its base weights) or `checkpoint`")
    return model.eval()


def build_reference(mode: str, policy: torch.nn.Module | None = None, *,
                    build_model: Callable[[], torch.nn.Module] | None = None, checkpoint=None, cp_group=None,
                    cache_path=None, expect: Mapping | None = None, shard: Callable | None = None) -> ReferenceErrors:
    """The ReferenceErrors for `mode` (config: objective.reference.mode).

    policy: the (possibly DDP-wrapped) policy model. build_model: builds a base model in the policy's layout
    (resident, cpu_swap), e.g. `lambda: build_wan(arch, pg, parallel, init_weights=False)`. checkpoint: load
    the reference from this base checkpoint instead of the policy's base weights. cp_group: the CP group (by
    default the model's). cache_path/expect: the cached mode's store and the attributes it must record.
    """
    if mode not in MODES:
        raise ValueError(f"unknown objective.reference.mode {mode!r}; expected one of {MODES}")
    if cp_group is None and policy is not None:
        cp_group = getattr(unwrap(policy), "cp_group", None)
    if mode == "lora_base":
        if policy is None:
            raise ValueError("mode 'lora_base' needs the policy")
        return LoraBaseReference(policy, cp_group)
    if mode == "cached":
        if cache_path is None:
            raise ValueError("mode 'cached' needs cache_path (written by tools/precompute_reference.py)")
        return CachedReference(ReferenceCache(cache_path, expect))
    if build_model is None:
        raise ValueError(f"mode {mode!r} needs build_model (a base model in the policy's layout)")
    if shard is not None and mode == "cpu_swap":
        raise ValueError("objective.reference.mode='cpu_swap' swaps whole weights: with parallel.fsdp use 'resident' "
                         "(sharded like the policy, 1/(DP x CP) of the weights per rank) or 'lora_base'/'cached'")
    model = frozen_reference_model(build_model, policy, checkpoint, shard)
    cp_group = cp_group if cp_group is not None else getattr(model, "cp_group", None)
    return ResidentReference(model, cp_group) if mode == "resident" else CpuSwapReference(model, cp_group)

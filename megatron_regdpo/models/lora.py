"""LoRA on Megatron-Core's tensor-parallel linears, sharded like the layer it adapts.

Legend: S tokens (this rank's slice under SP), B batch, r LoRA rank, I/O the FULL in/out features (I in
tensor names: this rank's input width), tp the tensor-parallel size. For a wrapped linear with weight W and bias b:

    y = W x + b + (alpha / r) * B A x          A: [r, I] kaiming-uniform, B: [O, r] zeros (so y = base at start)

Sharding follows the base layer, so the low-rank path needs only rank-r-wide communication:
- column-parallel (W split on its output rows): A [r, I] replicated, B [O/tp, r] split on dim 0 like W.
  Without SP, x is replicated and a = A x is complete on every rank, but its gradient is partial (each
  rank only sees its rows of B), so the gradient of a is summed over TP: A's gradient is then complete
  and identical on every rank, like any replicated weight. With SP, a = A x is computed on this rank's
  tokens and all-gathered along the sequence (backward reduce-scatters); A then only sees this rank's
  tokens and is tagged `sequence_parallel`, so finalize_model_grads sums its gradient over TP exactly as
  it does for layer norms.
- row-parallel (W split on its input columns): A [r, I/tp] split on dim 1 like W, B [O, r] replicated.
  The partial a = A_local x_local is all-reduced (reduce-scattered along the sequence under SP, where B
  then sees only this rank's tokens and is tagged `sequence_parallel`) before B, as the base reduces W x.

The fused per-head layouts (`linear_qkv` rows [q_h | k_h | v_h], `linear_kv` [k_h | v_h]) are just rows of
W: B's rows follow the same order and merging is W + (alpha/r) B A in our layout.

The adapter lives ON the wrapped module (parameters `lora_A`, `lora_B`, and a subclass of the module's own
class that adds the low-rank path): every existing name (checkpoint keys, conversion rules, pipeline layer
offsets) stays what it was, and the base module's own sharding of W and b is reused unchanged.
"""
from __future__ import annotations

import hashlib
import math
import struct
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (gather_from_sequence_parallel_region,
                                                    reduce_from_tensor_model_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region)
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from megatron_regdpo.parallel.collectives import sum_grad_over_group

LORA_PARAMS = ("lora_A", "lora_B")
# every linear of the Wan block; LoraConfig's default leaves out the I2V image K/V (linear_kv_img)
WAN_TARGETS = ("linear_qkv", "linear_proj", "linear_q", "linear_kv", "linear_kv_img", "linear_fc1", "linear_fc2")
_KINDS = {"ColumnParallelLinear": "column", "TEColumnParallelLinear": "column",
          "RowParallelLinear": "row", "TERowParallelLinear": "row"}


def _tp(module) -> tuple[int, int]:
    group = module.tp_group
    return torch.distributed.get_world_size(group), torch.distributed.get_rank(group)


class _LoRAMixin:
    """Mixed in front of the base linear's class by `apply_lora` (see `_lora_class`)."""

    lora_kind: str  # "column" | "row"

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank

    def forward(self, input_, *args, **kwargs):
        out, bias = super().forward(input_, *args, **kwargs)
        if self.lora_enabled and not self.lora_merged:
            out = out + self._lora_path(input_) * self.lora_scaling
        return out, bias

    def _lora_path(self, x_SBI: torch.Tensor) -> torch.Tensor:
        a_SBr = F.linear(x_SBI, self.lora_A)   # row-parallel: a partial sum over this rank's input features
        sp = getattr(self, "sequence_parallel", False)
        if self.lora_kind == "column":
            a_SBr = (gather_from_sequence_parallel_region(a_SBr, tensor_parallel_output_grad=True, group=self.tp_group)
                     if sp else sum_grad_over_group(a_SBr, self.tp_group))
        else:
            a_SBr = (reduce_scatter_to_sequence_parallel_region(a_SBr, group=self.tp_group)
                     if sp else reduce_from_tensor_model_parallel_region(a_SBr, group=self.tp_group))
        return F.linear(a_SBr, self.lora_B)

    def lora_delta_weight(self) -> torch.Tensor:
        """(alpha/r) * B @ A in this rank's shard layout of W."""
        return (self.lora_B.float() @ self.lora_A.float() * self.lora_scaling).to(self.weight.dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        if self.lora_merged:
            raise ValueError(f"{prefix or 'a LoRA layer'}: adapters are merged into the base weight; "
                             "unmerge_lora(model) before saving, or the delta would be saved twice")
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        axes = {"lora_B": 0} if self.lora_kind == "column" else {"lora_A": 1}
        state.update(make_sharded_tensors_for_checkpoint(
            {"lora_A": self.lora_A, "lora_B": self.lora_B}, prefix, axes, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=ensure_metadata_has_dp_cp_group(metadata)["dp_cp_group"]))
        return state


_CLASSES: dict[tuple[type, str], type] = {}


def _lora_class(base_cls: type, kind: str) -> type:
    if (base_cls, kind) not in _CLASSES:
        _CLASSES[base_cls, kind] = type(f"LoRA{base_cls.__name__}", (_LoRAMixin, base_cls),
                                        {"lora_kind": kind, "__module__": __name__})
    return _CLASSES[base_cls, kind]


def _kind(module) -> str | None:
    for cls in type(module).__mro__:
        if cls.__name__ in _KINDS:
            return _KINDS[cls.__name__]
    return None


def _init_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(struct.pack("<Q", seed) + name.encode(), digest_size=8, person=b"regdpo-lora").digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _global_name(model: torch.nn.Module, name: str) -> str:
    """`name` with TransformerBlock's local layer index replaced by the global one (pipeline stages number
    their layers from 0), so a layer's adapter init does not depend on the pipeline layout."""
    parts, module = name.split("."), model
    for i, part in enumerate(parts):
        module = getattr(module, part)
        if part.isdigit() and isinstance(getattr(module, "layer_number", None), int):
            parts[i] = str(module.layer_number - 1)
    return ".".join(parts)


def _wrap(module, kind: str, rank: int, alpha: float, seed: int) -> None:
    if getattr(module, "gather_output", False):
        raise ValueError("LoRA on a column-parallel linear with gather_output=True is not supported")
    tp, tp_rank = _tp(module)
    w = module.weight
    full_in = w.shape[1] * (tp if kind == "row" else 1)
    # A is drawn at full size from a generator keyed by (seed, layer name) and then sliced: the same
    # adapter for any TP/PP layout, and identical replicas on every TP rank without a broadcast.
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(full_in)  # kaiming_uniform_(a=sqrt(5)), nn.Linear's and PEFT's default
    a_full = torch.empty(rank, full_in).uniform_(-bound, bound, generator=g)
    a = a_full.chunk(tp, dim=1)[tp_rank] if kind == "row" else a_full
    b_rows = w.shape[0]
    module.__class__ = _lora_class(type(module), kind)
    module.lora_A = torch.nn.Parameter(a.to(device=w.device, dtype=w.dtype).contiguous())
    module.lora_B = torch.nn.Parameter(torch.zeros(b_rows, rank, device=w.device, dtype=w.dtype))
    module.lora_rank, module.lora_alpha, module.lora_enabled, module.lora_merged = rank, float(alpha), True, False
    split, replicated = (module.lora_B, module.lora_A) if kind == "column" else (module.lora_A, module.lora_B)
    split_dim = 0 if kind == "column" else 1
    for p, is_split in ((split, True), (replicated, False)):
        setattr(p, "tensor_model_parallel", is_split)
        setattr(p, "partition_dim", split_dim if is_split else -1)
        setattr(p, "partition_stride", 1)
        # replicated over TP but computed from this rank's tokens only: gradients summed over TP
        setattr(p, "sequence_parallel", bool(getattr(module, "sequence_parallel", False)) and not is_split)


def apply_lora(model: torch.nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = WAN_TARGETS,
               seed: int = 0) -> torch.nn.Module:
    """Add adapters to every TP linear whose last name component is in `targets`; freeze everything else."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {rank}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    matched = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets]
    # a known Wan name may be absent (a T2V model has no linear_kv_img); anything else is a typo
    missing = sorted(set(targets) - {n.rsplit(".", 1)[-1] for n, _ in matched} - set(WAN_TARGETS))
    if missing or not matched:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _kind(m)})
        raise ValueError(f"LoRA targets {missing or sorted(targets)} match no module; this model's TP linears "
                         f"are {linears}")
    for name, module in matched:  # every check before the first change: no half-adapted model on error
        if _kind(module) is None:
            raise ValueError(f"LoRA target {name} is a {type(module).__name__}, not a tensor-parallel linear")
        if isinstance(module, _LoRAMixin):
            raise ValueError(f"{name} already has a LoRA adapter")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in matched:
        _wrap(module, _kind(module), rank, alpha, _init_seed(seed, _global_name(model, name)))
    return model


def lora_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _LoRAMixin)]


def has_lora(model: torch.nn.Module) -> bool:
    return any(isinstance(m, _LoRAMixin) for m in model.modules())


def is_lora_param(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LORA_PARAMS


def lora_settings(model: torch.nn.Module) -> dict | None:
    """{rank, alpha, targets} for a checkpoint's model.json (None without LoRA), read back by `apply_lora`."""
    mods = lora_modules(model)
    if not mods:
        return None
    ranks = {(m.lora_rank, m.lora_alpha) for _, m in mods}
    assert len(ranks) == 1, f"mixed LoRA settings {ranks}"
    (rank, alpha), = ranks
    return {"rank": rank, "alpha": alpha, "targets": sorted({n.rsplit(".", 1)[-1] for n, _ in mods})}


@contextmanager
def lora_disabled(model: torch.nn.Module):
    """Adapters off: the model computes its base (the `lora_base` reference). Restores the state on exit."""
    mods = [m for _, m in lora_modules(model)]
    if not mods:
        raise ValueError("lora_disabled: the model has no LoRA adapters")
    if any(m.lora_merged for m in mods):
        raise ValueError("lora_disabled: adapters are merged into the base weights; unmerge_lora(model) first")
    before = [m.lora_enabled for m in mods]
    for m in mods:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(mods, before):
            m.lora_enabled = state


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> None:
    """W += (alpha/r) B A in place (no communication: each rank merges its own shard)."""
    for name, m in lora_modules(model):
        if not m.lora_enabled:
            raise ValueError(f"merge_lora: the adapter of {name} is switched off (inside lora_disabled)")
        if not m.lora_merged:
            m.weight.add_(m.lora_delta_weight())
            m.lora_merged = True


@torch.no_grad()
def unmerge_lora(model: torch.nn.Module) -> None:
    """Inverse of merge_lora, up to floating-point round-off of the add and subtract."""
    for _, m in lora_modules(model):
        if m.lora_merged:
            m.weight.sub_(m.lora_delta_weight())
            m.lora_merged = False


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights the model computes with, in the base layout (this rank's shards): every active adapter
    folded into its base weight, the LoRA entries dropped. The model is not modified."""
    state = {k: v for k, v in model.state_dict().items() if not is_lora_param(k)}
    for name, m in lora_modules(model):
        if m.lora_enabled and not m.lora_merged:
            key = f"{name}.weight"
            state[key] = state[key] + m.lora_delta_weight()
    return state


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base weights alone (adapters ignored, not merged): the `lora_base` model's state."""
    if any(m.lora_merged for _, m in lora_modules(model)):
        raise ValueError("adapters are merged into the base weights; unmerge_lora(model) first")
    return {k: v for k, v in model.state_dict().items() if not is_lora_param(k)}


def load_base_weights(model: torch.nn.Module, ckpt_dir) -> None:
    """Load a checkpoint WITHOUT adapters (the base model) into a LoRA model, keeping its adapters as they are.
    Either backend's checkpoint loads into either backend's model (megatron_ckpt.load_sharded: extra state the
    checkpoint lacks keeps the model's own); a tensor the checkpoint lacks is an error naming it."""
    from megatron_regdpo.checkpoint_io.megatron_ckpt import load_sharded, with_own_extra_state

    sharded = {k: v for k, v in model.sharded_state_dict().items() if not is_lora_param(k)}
    state = load_sharded(sharded, ckpt_dir)  # checksums, no code from the files
    loaded = with_own_extra_state(model, {k: v for k, v in state.items() if k in sharded})
    result = model.load_state_dict(loaded, strict=False)
    wrong = [k for k in result.missing_keys if not is_lora_param(k)]
    if wrong or result.unexpected_keys:
        raise KeyError(f"{ckpt_dir}: missing {wrong[:8]}, unexpected {result.unexpected_keys[:8]}")

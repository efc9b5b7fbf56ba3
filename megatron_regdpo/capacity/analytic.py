"""What the simulation cannot run on this machine, modelled from counts and applied to its result.

- Megatron-FSDP (CUDA-only in megatron-core: DeviceMesh("cuda"), CUDA streams): the simulation runs DDP,
  then the resident state is re-counted as FSDP's `optim_grads_params` sharding keeps it. Parameters, their
  gradients and the optimizer state are split over the DP x CP group (megatron's `dp_cp` mesh dimension);
  two WanLayers (the one computing and the prefetched next) hold gathered weights, and two their full
  gradients before the reduce-scatter. The optimizer update's transient (fp32 gradient copies) shrinks by
  the same factor. The resident reference (objective.reference.mode) is a separate, unwrapped copy in our
  trainer and stays whole.
- Transformer Engine FP8 (delayed or current scaling): TE is not installable without CUDA. Its linears keep
  their input for backward in FP8 (1 byte) instead of bf16 (2 bytes), and keep the FP8 weight and its
  transpose (2 bytes per weight) for backward. Inputs held only by a linear shrink: the three modulated
  norm outputs (self-attention QKV, cross-attention Q, FFN in) and the FFN's inner activation; the
  attention projections' inputs are also held by the attention kernel and do not. Both terms apply to
  every layer whose activations are live in backward (all of them, or one under full recompute).
  Uncalibrated: the FP8 terms need a GPU measurement (none was lent), the FSDP terms too.
"""
from __future__ import annotations

import dataclasses

from .simulate import StepMemory

STATIC = ("weights", "grads", "optimizer")


def _shift(mem: StepMemory, delta: dict, phases: dict | None = None, note: str = "") -> StepMemory:
    """Add `delta` (bytes per category) to every phase peak (or per phase, `phases`: {phase: bytes})."""
    total = sum(delta.values())
    phase_peaks = {ph: v + (phases.get(ph, 0) if phases is not None else total) for ph, v in mem.phase_peaks.items()}
    peak_phase = max(phase_peaks, key=phase_peaks.get)
    breakdown = dict(mem.breakdown)
    if phases is None or peak_phase in phases:
        for c, d in delta.items():
            breakdown[c] = breakdown.get(c, 0) + d
    return dataclasses.replace(mem, peak=phase_peaks[peak_phase], peak_phase=peak_phase, breakdown=breakdown,
                               phase_peaks=phase_peaks, notes=[*mem.notes, note] if note else mem.notes)


def apply_fsdp(mem: StepMemory, shard: int) -> StepMemory:
    """Megatron-FSDP over `shard` = DP x CP ranks, from a DDP simulation of the same step."""
    layer_w, layer_g = mem.sizes["layer_weight_bytes"], mem.sizes["layer_grad_bytes"]
    sharded = {"weights": mem.static["weights"] / shard + 2 * layer_w,
               "grads": mem.static["grads"] / shard + 2 * layer_g,
               "optimizer": mem.static["optimizer"] / shard}
    delta = {c: int(sharded[c] - mem.static[c]) for c in STATIC}
    static = {**mem.static, **{c: int(sharded[c]) for c in STATIC}}
    base = sum(delta.values())
    update = mem.phase_peaks.get("optimizer", 0) - sum(mem.static[c] for c in mem.static if c != "host")
    phases = {ph: base for ph in mem.phase_peaks}
    phases["optimizer"] = base - int(max(update, 0) * (1 - 1 / shard))
    note = (f"Megatron-FSDP modelled (CUDA-only): params/grads/optimizer / {shard} (DP x CP) + 2 gathered layers "
            f"({2 * layer_w / 2**30:.2f} GiB weights, {2 * layer_g / 2**30:.2f} GiB grads)")
    return dataclasses.replace(_shift(mem, delta, phases, note), static=static)


def fp8_delta(mem: StepMemory, arch, cfg) -> int:
    """Bytes FP8 adds (negative: saves) to the forward/backward peak; see the module docstring."""
    par = cfg.parallel
    samples = 2 * cfg.data.micro_batch_pairs
    tokens = samples * mem.tokens // par.cp               # this rank's token chunk, both clips of a pair
    seq_tokens = tokens // par.tp if par.sequence_parallel else tokens
    d, f = arch.hidden, arch.ffn_dim
    saved_bytes = seq_tokens * 3 * d + tokens * f // par.tp  # elements x (2 - 1) bytes
    live_layers = 1 if cfg.model.recompute == "full" else arch.num_layers // par.pp
    weight_bytes = 2 * mem.sizes["layer_linear_params"]      # FP8 weight + transpose, 1 byte each
    return live_layers * (weight_bytes - saved_bytes)


def apply_fp8(mem: StepMemory, arch, cfg) -> StepMemory:
    delta = fp8_delta(mem, arch, cfg)
    note = (f"TE FP8 modelled (TE needs CUDA), uncalibrated: {delta / 2**30:+.2f} GiB in forward/backward "
            f"(FP8 saved inputs, FP8 weight + transpose per live layer)")
    return _shift(mem, {"activations": delta}, {"forward_backward": delta}, note)

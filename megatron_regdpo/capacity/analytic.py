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


def _shift(mem: StepMemory, deltas: dict, note: str) -> StepMemory:
    """Apply `deltas` = {phase: {category: bytes}} to each phase's peak and its breakdown; the step's peak
    is then the highest phase."""
    peaks, breakdowns = dict(mem.phase_peaks), {ph: dict(b) for ph, b in mem.phase_breakdowns.items()}
    for ph, delta in deltas.items():
        if ph in peaks:
            peaks[ph] += sum(delta.values())
            for c, d in delta.items():
                breakdowns[ph][c] = breakdowns[ph].get(c, 0) + d
    top = max(peaks, key=peaks.get)
    return dataclasses.replace(mem, peak=peaks[top], peak_phase=top, breakdown=breakdowns[top], phase_peaks=peaks,
                               phase_breakdowns=breakdowns, notes=[*mem.notes, note])


def apply_fsdp(mem: StepMemory, shard: int) -> StepMemory:
    """Megatron-FSDP over `shard` = DP x CP ranks, from a DDP simulation of the same step."""
    layer_w, layer_g = mem.sizes["layer_weight_bytes"], mem.sizes["layer_grad_bytes"]
    sharded = {"weights": mem.static["weights"] // shard + 2 * layer_w,
               "grads": mem.static["grads"] // shard + 2 * layer_g,
               "optimizer": mem.static["optimizer"] // shard}
    delta = {c: sharded[c] - mem.static[c] for c in STATIC}
    deltas = {ph: dict(delta) for ph in mem.phase_peaks}
    if "optimizer" in mem.phase_breakdowns:   # the update's transient (fp32 gradient copies) is sharded too
        update = mem.phase_breakdowns["optimizer"]["optimizer"] - mem.static["optimizer"]
        deltas["optimizer"]["optimizer"] -= max(update, 0) - max(update, 0) // shard
    note = (f"Megatron-FSDP modelled (CUDA-only): params/grads/optimizer / {shard} (DP x CP) + 2 gathered layers "
            f"({2 * layer_w / 2**30:.2f} GiB weights, {2 * layer_g / 2**30:.2f} GiB grads)")
    return dataclasses.replace(_shift(mem, deltas, note), static={**mem.static, **sharded})


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
    return _shift(mem, {"forward_backward": {"activations": delta}}, note)

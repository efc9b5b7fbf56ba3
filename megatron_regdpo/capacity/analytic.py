"""What the simulation cannot run on this machine, modelled from counts and applied to its result.

- Transformer Engine FP8 (delayed or current scaling): TE is not installable without CUDA. Its linears keep
  their input for backward in FP8 (1 byte) instead of bf16 (2 bytes), and keep the FP8 weight and its
  transpose (2 bytes per weight) for backward. Inputs held only by a linear shrink: the three modulated
  norm outputs (self-attention QKV, cross-attention Q, FFN in) and the FFN's inner activation; the
  attention projections' inputs are also held by the attention kernel and do not. Both terms apply to
  every layer whose activations are live in backward (all of them, or one under full recompute).
  Uncalibrated: the FP8 terms need a GPU measurement (none was lent).

FSDP2 (parallel.fsdp) is not modelled here: the simulation runs it (capacity/fake_world.py).
"""
from __future__ import annotations

import dataclasses

from .simulate import StepMemory


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

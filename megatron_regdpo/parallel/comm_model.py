"""Analytic bytes per rank per training step (policy forward/backward + gradient finalisation) for a
parallel layout, under the counting convention of comm_count.py. fp32 activations and gradients.

Legend: B samples per micro-batch (2 per pair), M micro-batches on this rank, S tokens per sample,
S_c = S / cp, T text tokens, I image tokens (I2V), D hidden, L_s layers on this stage, t/c/p/d the
TP/CP/PP/DP sizes. Terms are listed per collective so a mismatch points at its cause.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepShape:
    hidden: int
    layers: int
    tokens: int           # S
    text_tokens: int      # T
    image_tokens: int     # I (0 for T2V)
    samples: int          # B per micro-batch
    microbatches: int     # M on this rank
    cross_attn_norm: bool = True


def expected_bytes(shape: StepShape, tp: int, cp: int, pp: int, dp: int, sp: bool, pp_rank: int,
                   local_params: int, cond_params: int, dist_opt: bool = False, elem: int = 4) -> dict[str, int]:
    """{collective@group_size: bytes} this rank should hand to collectives in one step."""
    D, B, M, T, I = shape.hidden, shape.samples, shape.microbatches, shape.text_tokens, shape.image_tokens
    S_c, L = shape.tokens // cp, shape.layers // pp
    first, last = pp_rank == 0, pp_rank == pp - 1
    out: dict[str, int] = {}

    def add(key: str, elements: int) -> None:
        if elements:
            out[key] = out.get(key, 0) + elements * elem

    if tp > 1:
        ar, ag, rs = f"all_reduce@{tp}", f"all_gather_into_tensor@{tp}", f"reduce_scatter_tensor@{tp}"
        norms = 2 * S_c * B + S_c * B + T * B + I * B       # q/k sum-of-squares: self q, k; cross q, k, k_img
        add(ar, 2 * norms * L * M)                          # forward and backward
        add(ar, (T + I) * B * D * L * M)                    # context K/V input grads (never sequence-split)
        if sp:
            add(ag, 3 * S_c * B * D * L * M)                # fwd: gather inputs of qkv, q, fc1
            add(rs, 3 * S_c * B * D * L * M)                # fwd: scatter outputs of proj, cross proj, fc2
            add(rs, 3 * S_c * B * D * L * M)                # bwd: input grads of the three column linears
            add(ag, 3 * S_c * B * D * L * M)                # bwd: their inputs again, for the weight grads
            add(ag, 3 * S_c * B * D * L * M)                # bwd: output grads of the three row linears
            add(ag, (first + last) * S_c * B * D * M)       # scatter (bwd) before the blocks, gather (fwd) after
            add(ar, 6 * D * B * M)                          # adaLN modulation grad (partial per token slice)
            # finalize: SP-tagged params: norm2 (2D), scale_shift_table (6D), the 3 row-linear biases (3D)
            add(ar, ((2 if shape.cross_attn_norm else 0) + 6 + 3) * D * L)
        else:
            add(ar, 3 * S_c * B * D * L * M)                # fwd: outputs of the three row linears
            add(ar, 3 * S_c * B * D * L * M)                # bwd: input grads of qkv, q, fc1
    if cp > 1:
        add(f"all_gather_into_tensor@{cp}", 2 * shape.tokens * B * (D // tp) * L * M)   # K and V
        add(f"reduce_scatter_tensor@{cp}", 2 * shape.tokens * B * (D // tp) * L * M)   # their grads
        if last:
            add(f"all_reduce@{cp}", B * M)                  # per-sample squared-error sums
            out[f"all_reduce@{cp}"] += 8 * M                # element counts (int64)
    if pp > 1:
        act = (S_c // (tp if sp else 1)) * B * D
        # receive activations from / send their grads to the previous stage; the mirror with the next one
        add("p2p@2", ((0 if first else 2) + (0 if last else 2)) * act * M)
        add(f"all_reduce@{pp}", cond_params)                # finalize: conditioning replicated on all stages
    if dp * cp > 1:  # DDP gradients over DP x CP: all-reduce, or reduce-scatter into optimizer shards
        add(f"{'reduce_scatter_tensor' if dist_opt else 'all_reduce'}@{dp * cp}", local_params)
    return out

"""Analytic FLOPs of the Wan2.1 DiT: forward FLOPs per component, and model/hardware FLOPs per step.

Legend: B samples, S video tokens = (F/pt)(H/ph)(W/pw), T text tokens, I image tokens (I2V only),
L layers, D hidden, H heads, K head dim (D = H*K), Dff FFN width, Et text-encoder width, Ei CLIP
image width, Df time-sinusoid width (freq_dim), Cin/Cout latent channels, P = pt*ph*pw patch volume.

What is counted: every matmul, a multiply-add being 2 FLOPs ([m, k] @ [k, n] costs 2mkn), and the two
products of each attention, QK^T and AV (2 * 2 * B * H * Sq * Skv * K). The patch embedding is a Conv3d
whose stride equals its kernel, i.e. one matmul over non-overlapping patches. Not counted: biases,
norms, softmax, RoPE, activations, the adaLN modulation, the timestep sinusoid and every other
elementwise op (each O(B*S*D), against O(B*S*D^2) for the matmuls). These are the rules of
torch.utils.flop_counter; tests/unit/test_flops.py checks the formula against it, component by component.

Counts are for the whole model and the whole batch: TP, CP and PP split the same work over ranks.
Not included anywhere: LoRA adapters (2 * r * (d_in + d_out) per token and adapted linear), and under
PP the conditioning (time, text and image embedding) that every stage recomputes.
"""
from __future__ import annotations

import math

from .arch import WanArch

# the per-block terms (what full recompute runs again) and the core attention (what selective does)
BLOCK_TERMS = ("self_attn_proj", "self_attn_core", "cross_attn_proj", "cross_attn_core", "ffn")
CORE_TERMS = ("self_attn_core", "cross_attn_core")
RECOMPUTE = ("none", "selective", "full")


def token_count(arch: WanArch, latent_fhw: tuple[int, int, int]) -> int:
    """S: the video tokens of one sample with latent (F, H, W) after patchifying."""
    (f, h, w), (pt, ph, pw) = latent_fhw, arch.patch
    if f % pt or h % ph or w % pw:
        raise ValueError(f"latent (F, H, W) = {tuple(latent_fhw)} is not divisible by the patch {arch.patch}")
    return (f // pt) * (h // ph) * (w // pw)


def _image_tokens(arch: WanArch, image_tokens: int | None) -> int:
    """I: the model splits its context at `arch.image_tokens` (I2V), so any other count is a mistake."""
    expected = arch.image_tokens if arch.task == "i2v" else 0
    if image_tokens is not None and image_tokens != expected:
        raise ValueError(f"image_tokens={image_tokens}, but a {arch.task} model with this arch "
                         f"attends to exactly {expected} image tokens")
    return expected


def wan_forward_flops(arch: WanArch, batch: int, latent_fhw: tuple[int, int, int], text_tokens: int,
                      image_tokens: int | None = None) -> dict[str, int]:
    """Forward FLOPs of `batch` samples, per component, plus their sum under `total`.

    `text_tokens` is the context length the model sees (Wan pads the T5 context to data.text_len, 512);
    `image_tokens` defaults to the architecture's (257 CLIP tokens for I2V, none for T2V).
    Per block (each term below is multiplied by L):
      self_attn_proj   fused qkv (D -> 3D) and output (D -> D) projections on the S video tokens:
                       2*B*S*(3D^2 + D^2)
      self_attn_core   QK^T and AV over all S x S token pairs in every head: 2*2*B*H*S*S*K
      cross_attn_proj  q and output (D -> D) on the S video tokens; fused k,v (D -> 2D) on the T text
                       tokens, and for I2V the separate added k,v on the I image tokens:
                       2*B*(2*S*D^2 + 2*(T + I)*D^2)
      cross_attn_core  video queries against the text keys, and for I2V (a second attention, its output
                       added) against the image keys: 2*2*B*H*S*(T + I)*K
      ffn              D -> Dff -> D on the S video tokens: 2*B*S*2*D*Dff
    Once per forward:
      patch_embed      Conv3d as a matmul of each patch's Cin*P values to D: 2*B*S*Cin*P*D
      time_embed       the time MLP (Df -> D -> D) and the 6-way modulation projection (D -> 6D), one
                       row per sample: 2*B*(Df*D + D^2 + 6D^2)
      text_embed       the text MLP (Et -> D -> D) on the T text tokens: 2*B*T*(Et*D + D^2)
      image_embed      I2V: the CLIP MLP (Ei -> Ei -> D) on the I image tokens: 2*B*I*(Ei^2 + Ei*D)
      head             proj_out (D -> Cout*P) on the S video tokens: 2*B*S*D*Cout*P
    """
    s, t, i = token_count(arch, latent_fhw), text_tokens, _image_tokens(arch, image_tokens)
    b, n, d, h, k = batch, arch.num_layers, arch.hidden, arch.num_heads, arch.head_dim
    p, ei = math.prod(arch.patch), arch.image_dim or 0
    terms = {
        "self_attn_proj": n * 2 * b * s * (3 * d * d + d * d),
        "self_attn_core": n * 2 * 2 * b * h * s * s * k,
        "cross_attn_proj": n * 2 * b * (2 * s * d * d + 2 * (t + i) * d * d),
        "cross_attn_core": n * 2 * 2 * b * h * s * (t + i) * k,
        "ffn": n * 2 * b * s * 2 * d * arch.ffn_dim,
        "patch_embed": 2 * b * s * arch.in_channels * p * d,
        "time_embed": 2 * b * (arch.freq_dim * d + d * d + 6 * d * d),
        "text_embed": 2 * b * t * (arch.text_dim * d + d * d),
        "image_embed": 2 * b * i * (ei * ei + ei * d),
        "head": 2 * b * s * d * arch.out_channels * p,
    }
    terms["total"] = sum(terms.values())
    return terms


def wan_step_flops(arch: WanArch, latent_fhw: tuple[int, int, int], text_tokens: int,
                   image_tokens: int | None = None, *, pairs: int, reference_forward: bool,
                   recompute: str = "none") -> dict[str, int]:
    """FLOPs of one optimizer step over `pairs` preference pairs (all micro-batches of all
    data-parallel ranks), each pair being two samples (winner and loser, stacked on the batch).

      model      policy forward + backward of the 2*pairs samples, backward counted as 2x forward
                 (gradients of inputs and of weights): 3 * forward. The conventional figure for MFU.
                 The true backward is slightly smaller: the patch embedding, the first text-MLP and the
                 first time-MLP linear need no input gradient (the latents, text embeddings and
                 sinusoid are data), and with frozen base weights (LoRA) no weight gradient is taken.
      reference  the reference model's forward of the same 2*pairs samples, when it runs one
                 (reference.mode lora_base, resident or cpu_swap); 0 when they are cached.
      recompute  what activation recompute runs again during the backward: "full" = one more forward
                 of the L blocks, "selective" = one more forward of the core attention (self and
                 cross), "none" = 0. Flash kernels' own recompute of QK^T in their backward is not added.
      hardware   model + reference + recompute: what the accelerator actually executes.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}; expected one of {RECOMPUTE}")
    if pairs < 1:
        raise ValueError(f"pairs={pairs}; need at least one preference pair per step")
    fwd = wan_forward_flops(arch, 2 * pairs, latent_fhw, text_tokens, image_tokens)
    again = {"none": (), "selective": CORE_TERMS, "full": BLOCK_TERMS}[recompute]
    out = {"model": 3 * fwd["total"], "reference": fwd["total"] if reference_forward else 0,
           "recompute": sum(fwd[name] for name in again)}
    out["hardware"] = out["model"] + out["reference"] + out["recompute"]
    return out

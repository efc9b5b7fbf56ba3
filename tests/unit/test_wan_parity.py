"""Numerical parity of our Megatron Wan (local backend, fp32, CPU) with diffusers' WanTransformer3DModel.

Both models are built from the same small random architecture; the diffusers weights (randomised so that
norm scales, biases and zero-initialised tensors are all non-trivial) are streamed into ours through the
conversion rules. Outputs and the gradient of every parameter must agree to fp32 rounding.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_regdpo.checkpoint_io.engine import check_keys, to_ours
from megatron_regdpo.models.wan.arch import SIZES, WanArch
from megatron_regdpo.models.wan.build import build_wan
from megatron_regdpo.models.wan.mapping import IGNORED_DIFFUSERS_KEYS, wan_rules

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
DIFFUSERS_I2V_TEXT_LEN = 512  # diffusers' Wan cross-attention hard-codes the text length of the I2V context

DEBUG = SIZES["debug"]  # hidden 64 = 4 heads x 16, text_dim 32, freq_dim 32, ffn 128, 2 layers
ARCHS: dict[str, WanArch] = {
    "t2v": DEBUG,
    # 6 heads of 12: RoPE bands (12 - 4*2, 2*2, 2*2) = (4, 4, 4), unlike the (8, 4, 4) of head_dim 16
    "t2v-3L-6H-hd12": dataclasses.replace(DEBUG, num_layers=3, num_heads=6, head_dim=12, ffn_dim=96),
    "t2v-no-cross-norm": dataclasses.replace(DEBUG, cross_attn_norm=False),
    "i2v": dataclasses.replace(DEBUG, image_dim=24, in_channels=36, image_tokens=5),
}

# (arch, batch, latent frames, latent height, latent width, text tokens)
CASES = [
    ("t2v", 1, 1, 4, 8, 7),
    ("t2v", 2, 3, 6, 10, 7),
    ("t2v", 1, 5, 4, 4, 3),
    ("t2v", 2, 2, 8, 6, 11),
    ("t2v-3L-6H-hd12", 2, 3, 6, 10, 5),
    ("t2v-3L-6H-hd12", 1, 5, 4, 8, 9),
    ("t2v-no-cross-norm", 2, 3, 4, 8, 6),
    ("i2v", 1, 1, 4, 8, DIFFUSERS_I2V_TEXT_LEN),
    ("i2v", 2, 3, 6, 10, DIFFUSERS_I2V_TEXT_LEN),
]


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - b| / max|b|; for an all-zero reference, max|a| (so both must be zero)."""
    diff = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def _reference(arch: WanArch):
    ref = diffusers.WanTransformer3DModel(**arch.diffusers_config()).float()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


def _ours_from(ref, arch: WanArch, pg):
    rules = wan_rules(arch)
    # the rules account for every diffusers tensor (nothing dropped on conversion)
    check_keys(ref.state_dict().keys(), [n for r in rules for n in r.theirs], "diffusers", IGNORED_DIFFUSERS_KEYS)
    ours = build_wan(arch, pg, backend="local", params_dtype=torch.float32)
    converted = dict(to_ours(rules, ref.state_dict().__getitem__, arch.num_heads))
    result = ours.load_state_dict(converted, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.endswith("_extra_state") for k in result.missing_keys), result.missing_keys
    assert set(converted) == {n for n, _ in ours.named_parameters()}
    return ours, rules


def _inputs(arch: WanArch, batch: int, frames: int, height: int, width: int, text_len: int):
    latents = torch.randn(batch, arch.in_channels, frames, height, width)
    timestep = torch.rand(batch) * 1000.0  # a different float timestep per sample
    text = torch.randn(batch, text_len, arch.text_dim)
    image = torch.randn(batch, arch.image_tokens, arch.image_dim) if arch.image_dim is not None else None
    return latents, timestep, text, image


@pytest.mark.parametrize("name,batch,frames,height,width,text_len", CASES,
                         ids=[f"{c[0]}-B{c[1]}-F{c[2]}-{c[3]}x{c[4]}-T{c[5]}" for c in CASES])
def test_forward_and_grad_parity(pg, name, batch, frames, height, width, text_len):
    arch = ARCHS[name]
    ref = _reference(arch)
    ours, rules = _ours_from(ref, arch, pg)
    latents, timestep, text, image = _inputs(arch, batch, frames, height, width, text_len)

    out_ref = ref(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                  encoder_hidden_states_image=image, return_dict=False)[0]
    out = ours(latents, timestep, text, image)
    assert out.shape == out_ref.shape == (batch, arch.out_channels, frames, height, width)
    assert out.dtype == torch.float32
    assert _rel_err(out, out_ref) < TOL

    weights = torch.randn_like(out_ref)
    (out_ref * weights).sum().backward()
    (out * weights).sum().backward()

    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    missing_ref = sorted(n for n, g in ref_grads.items() if g is None)
    assert not missing_ref, f"diffusers params without grad: {missing_ref}"
    expected = dict(to_ours(rules, ref_grads.__getitem__, arch.num_heads))

    params = dict(ours.named_parameters())
    no_grad = sorted(n for n, p in params.items() if p.grad is None)
    assert not no_grad, f"our params without grad: {no_grad}"
    assert set(expected) == set(params), "every parameter must be compared"

    errors = {n: _rel_err(params[n].grad, g) for n, g in expected.items()}
    for n, g in expected.items():
        assert params[n].grad.shape == g.shape, n
    bad = {n: e for n, e in errors.items() if not e < TOL}
    assert not bad, f"gradient mismatch (rel err >= {TOL}): {bad}"
    # the randomised reference gives every parameter a real gradient, so the comparison is not vacuous
    assert all(g.abs().max() > 0 for g in expected.values())


def test_i2v_without_image_embeddings_raises(pg):
    arch = ARCHS["i2v"]
    ours = build_wan(arch, pg, backend="local")
    latents, timestep, text, _ = _inputs(arch, 1, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="image"):
        ours(latents, timestep, text)

"""LoRA on the Wan model at TP1: identity at init, merge, scaling, targets, frozen base, adapters off,
checkpoint round trip, and export (merged diffusers weights; the PEFT adapter diffusers loads).

The TP/SP sharding of the adapters is checked against these results in tests/distributed/test_lora_tp.py.
"""
from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from safetensors import safe_open

from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model, save_model
from megatron_regdpo.models.lora import (apply_lora, base_state_dict, has_lora, is_lora_param, load_base_weights,
                                         lora_disabled, lora_modules, lora_settings, merge_lora, merged_state_dict,
                                         unmerge_lora)
from megatron_regdpo.models.wan.arch import SIZES
from megatron_regdpo.models.wan.build import build_wan
from megatron_regdpo.models.wan.convert import random_inputs

ARCH = SIZES["debug"]  # 2 layers, 4 heads x 16, ffn 128, text 32
RANK, ALPHA = 4, 8.0
TOL = 1e-5


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _inputs():
    return random_inputs(ARCH, batch=2, latent=(3, 4, 8), text_len=7, seed=1)[:3]


def _base(pg, seed=0):
    torch.manual_seed(seed)
    model = build_wan(ARCH, pg)
    with torch.no_grad():  # non-trivial biases and norm scales
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _randomise_b(model, std=0.2, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(std * torch.randn(m.lora_B.shape, generator=g))


@pytest.fixture(scope="module")
def base_out(pg):
    with torch.no_grad():
        return _base(pg)(*_inputs())


@pytest.fixture()
def lora_model(pg):
    model = apply_lora(_base(pg), RANK, ALPHA)
    _randomise_b(model)
    return model


def test_identity_at_init_and_targets(pg, base_out):
    model = apply_lora(_base(pg), RANK, ALPHA)
    names = [n for n, _ in lora_modules(model)]
    # T2V: qkv, proj, q, kv, proj, fc1, fc2 per layer (no linear_kv_img)
    assert len(names) == 7 * ARCH.num_layers
    assert {n.rsplit(".", 1)[-1] for n in names} == {"linear_qkv", "linear_proj", "linear_q", "linear_kv",
                                                     "linear_fc1", "linear_fc2"}
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), base_out)  # B = 0: exactly the base
    for _, m in lora_modules(model):
        assert torch.count_nonzero(m.lora_B) == 0 and m.lora_A.abs().max() <= 1 / m.lora_A.shape[1] ** 0.5
    targets = sorted({n.rsplit(".", 1)[-1] for n in names})
    assert lora_settings(model) == {"rank": RANK, "alpha": ALPHA, "targets": targets}

    only = apply_lora(_base(pg), RANK, ALPHA, targets=("linear_fc1", "linear_qkv"))
    assert sorted(n.split(".", 3)[-1] for n, _ in lora_modules(only)) == \
        sorted(["mlp.linear_fc1", "self_attention.linear_qkv"] * ARCH.num_layers)
    with pytest.raises(ValueError, match="linear_qvk"):
        apply_lora(_base(pg), RANK, ALPHA, targets=("linear_qvk",))
    with pytest.raises(ValueError, match="not a tensor-parallel linear"):
        apply_lora(_base(pg), RANK, ALPHA, targets=("proj_out", "linear_fc1"))


def test_only_adapters_train(lora_model):
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_param(n) for n in trainable)
    assert len(trainable) == 2 * len(lora_modules(lora_model))
    lora_model(*_inputs()).square().mean().backward()
    for name, p in lora_model.named_parameters():
        if is_lora_param(name):
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name


def test_merge_equals_adapter_and_disabled_equals_base(lora_model, base_out):
    with torch.no_grad():
        out = lora_model(*_inputs())
        assert _rel(out, base_out) > 1e-2  # the adapters do something
        with lora_disabled(lora_model):
            assert torch.equal(lora_model(*_inputs()), base_out)
        assert torch.equal(lora_model(*_inputs()), out)  # switched back on
        merged_weights = merged_state_dict(lora_model)
        merge_lora(lora_model)
        assert _rel(lora_model(*_inputs()), out) < TOL
        for name, m in lora_modules(lora_model):
            assert torch.equal(m.weight, merged_weights[f"{name}.weight"])
        with pytest.raises(ValueError, match="unmerge"):
            with lora_disabled(lora_model):
                pass
        unmerge_lora(lora_model)
        assert _rel(lora_model(*_inputs()), out) < TOL
        with lora_disabled(lora_model):
            assert _rel(lora_model(*_inputs()), base_out) < TOL


def test_scaling_is_alpha_over_rank(pg):
    """For one column- and one row-parallel layer: delta = (alpha/r) * x A^T B^T."""
    model = apply_lora(_base(pg), RANK, ALPHA)
    _randomise_b(model)
    layer = model.decoder.layers[0]
    for m, width in ((layer.mlp.linear_fc1, ARCH.hidden), (layer.mlp.linear_fc2, ARCH.ffn_dim)):
        x = torch.randn(5, 2, width)
        with torch.no_grad():
            with lora_disabled(model):
                base, _ = m(x)
            out, _ = m(x)
            want = (ALPHA / RANK) * (x @ m.lora_A.T @ m.lora_B.T)
            m.lora_alpha = 2 * ALPHA
            out2, _ = m(x)
            m.lora_alpha = ALPHA
        assert _rel(out - base, want) < TOL
        assert _rel(out2 - base, 2 * want) < TOL


def test_checkpoint_round_trip(pg, lora_model, tmp_path):
    save_model(lora_model, tmp_path / "ckpt", {"lora": lora_settings(lora_model)})
    fresh = apply_lora(build_wan(ARCH, pg, init_weights=False), RANK, ALPHA, seed=7)
    load_model(fresh, tmp_path / "ckpt")
    want = lora_model.state_dict()
    got = fresh.state_dict()
    assert set(got) == set(want) and any(is_lora_param(k) for k in got)
    for k, v in want.items():
        if torch.is_tensor(v):
            assert torch.equal(got[k], v), k
    with torch.no_grad():
        assert torch.equal(fresh(*_inputs()), lora_model(*_inputs()))
    # a base checkpoint (no adapters) loads into a LoRA model, leaving its adapters alone
    save_model(_base(pg), tmp_path / "base", {})
    load_base_weights(fresh, tmp_path / "base")
    with torch.no_grad(), lora_disabled(fresh):
        assert torch.equal(fresh(*_inputs()), _base(pg)(*_inputs()))
    for name, m in lora_modules(fresh):
        assert torch.equal(m.lora_B, want[f"{name}.lora_B"])


def test_reference_state_is_the_base(lora_model, base_out, pg):
    copy = build_wan(ARCH, pg, init_weights=False)
    copy.load_state_dict(base_state_dict(lora_model), strict=True)
    assert not has_lora(copy)
    with torch.no_grad():
        assert torch.equal(copy(*_inputs()), base_out)


# ---- export ----------------------------------------------------------------------------------------------

HAS_PEFT = importlib.util.find_spec("peft") is not None
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed")


def _diffusers_base(lora_model):
    import diffusers

    from megatron_regdpo.models.wan.lora_export import merged_diffusers_tensors

    ref = diffusers.WanTransformer3DModel(**ARCH.diffusers_config()).float().eval()
    with torch.no_grad(), lora_disabled(lora_model):
        ref.load_state_dict(dict(merged_diffusers_tensors(lora_model, ARCH)), strict=True)
    return ref


def _run_diffusers(ref):
    x, t, txt = _inputs()
    with torch.no_grad():
        return ref(x, t, txt, return_dict=False)[0]


@needs_diffusers
def test_export_merged_matches_diffusers(lora_model, tmp_path):
    import diffusers

    from megatron_regdpo.models.wan.lora_export import export_merged

    paths = export_merged(lora_model, ARCH, tmp_path / "hf")
    assert paths
    ref = diffusers.WanTransformer3DModel.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ours = lora_model(*_inputs())
    assert _rel(_run_diffusers(ref), ours) < TOL


KEY = re.compile(r"transformer\.blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|attn2\.(to_q|to_k|to_v|to_out\.0)"
                 r"|ffn\.net\.(0\.proj|2))\.lora_(A|B)\.weight")


@needs_diffusers
def test_peft_adapter_file(lora_model, tmp_path):
    """Key names, shapes and metadata as diffusers reads them; applied with PEFT's rule W + (alpha/r) B A to
    the base diffusers model, it gives our LoRA model's output (alpha != r here: the scale is folded into B and
    the file says lora_alpha = r, the trained alpha kept in its own metadata entry)."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    from megatron_regdpo.models.wan.lora_export import ADAPTER_FILE, write_peft_adapter

    path = write_peft_adapter(lora_model, ARCH, tmp_path / "adapter")
    assert path.name == ADAPTER_FILE
    state, meta = WanLoraLoaderMixin.lora_state_dict(str(tmp_path / "adapter"), return_lora_metadata=True)
    assert len(state) == 2 * 10 * ARCH.num_layers and all(KEY.fullmatch(k) for k in state), sorted(state)[:4]
    assert ALPHA != RANK and meta["transformer.r"] == RANK and meta["transformer.lora_alpha"] == RANK
    adapted = {k[len("transformer."):].split(".lora_")[0] for k in state}
    assert sorted(meta["transformer.target_modules"]) == sorted(adapted)
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"]) == meta
        assert json.loads(f.metadata()["megatron_regdpo"]) == {"trained_rank": RANK, "trained_alpha": ALPHA,
                                                               "scale_folded_into_lora_B": ALPHA / RANK}
    # the fused qkv's A is shared by to_q/to_k/to_v
    assert torch.equal(state["transformer.blocks.0.attn1.to_q.lora_A.weight"],
                       state["transformer.blocks.0.attn1.to_v.lora_A.weight"])

    ref = _diffusers_base(lora_model)
    modules = dict(ref.named_modules())
    scale = meta["transformer.lora_alpha"] / meta["transformer.r"]
    with torch.no_grad():
        for key, a in state.items():
            if ".lora_A." not in key:
                continue
            name = key[len("transformer."):].split(".lora_A.")[0]
            lin, b = modules[name], state[key.replace(".lora_A.", ".lora_B.")]
            assert isinstance(lin, torch.nn.Linear) and a.shape == (RANK, lin.in_features) \
                and b.shape == (lin.out_features, RANK), name
            lin.weight.add_(scale * b @ a)
        ours = lora_model(*_inputs())
    assert _rel(_run_diffusers(ref), ours) < TOL


@needs_diffusers
@pytest.mark.skipif(not HAS_PEFT, reason="the 'peft' package is not installed: diffusers' load_lora_adapter needs it")
@pytest.mark.parametrize("how", ["folder", "file", "file_safetensors"])
def test_peft_adapter_loads_in_diffusers(lora_model, tmp_path, how):
    """Every way diffusers' transformer loads the file gives our output with alpha != r, including the file
    path alone, which reads no metadata (the scale is in lora_B)."""
    from megatron_regdpo.models.wan.lora_export import ADAPTER_FILE, write_peft_adapter

    path = write_peft_adapter(lora_model, ARCH, tmp_path / "adapter")
    ref = _diffusers_base(lora_model)
    if how == "folder":
        ref.load_lora_adapter(str(tmp_path / "adapter"), weight_name=ADAPTER_FILE, prefix="transformer")
    elif how == "file":
        ref.load_lora_adapter(str(path), prefix="transformer")
    else:
        ref.load_lora_adapter(str(path), prefix="transformer", use_safetensors=True)
    with torch.no_grad():
        ours = lora_model(*_inputs())
    assert _rel(_run_diffusers(ref), ours) < TOL


def test_lora_checkpoint_export_round_trip(pg, lora_model, tmp_path):
    """What tools/convert_checkpoint.py export does with a LoRA checkpoint: rebuild from model.json, load."""
    from megatron_regdpo.models.wan.lora_export import checkpoint_meta, load_lora_checkpoint

    save_model(lora_model, tmp_path / "ckpt", checkpoint_meta(lora_model, ARCH))
    back, arch = load_lora_checkpoint(tmp_path / "ckpt", pg)
    assert arch == ARCH
    with torch.no_grad():
        assert torch.equal(back(*_inputs()), lora_model(*_inputs()))


def test_i2v_adapter_names_cover_image_kv(pg):
    """I2V's image K/V projection (linear_kv_img, fused [k_h | v_h]) exports as add_k_proj / add_v_proj."""
    import dataclasses

    from megatron_regdpo.models.wan.lora_export import peft_adapter_tensors

    arch = dataclasses.replace(ARCH, in_channels=36, image_dim=24, image_tokens=5)
    model = apply_lora(build_wan(arch, pg), RANK, ALPHA)
    _randomise_b(model)
    state = peft_adapter_tensors(model, arch)
    assert len(state) == 2 * 12 * arch.num_layers
    kv = model.decoder.layers[1].cross_attention.linear_kv_img
    b_k = state["transformer.blocks.1.attn2.add_k_proj.lora_B.weight"]
    b_v = state["transformer.blocks.1.attn2.add_v_proj.lora_B.weight"]
    assert b_k.shape == b_v.shape == (arch.hidden, RANK)
    # head h's rows of the fused B are [k_h | v_h] (alpha/r folded in)
    b = kv.lora_B * kv.lora_scaling
    assert torch.equal(b[:arch.head_dim], b_k[:arch.head_dim])
    assert torch.equal(b[arch.head_dim:2 * arch.head_dim], b_v[:arch.head_dim])
    assert torch.equal(state["transformer.blocks.1.attn2.add_v_proj.lora_A.weight"], kv.lora_A)

"""Checkpoints load into either backend whatever backend wrote them.

Transformer Engine cannot run here; what differs between a te and a local model in a checkpoint is the
`_extra_state` objects of TE modules that local ones lack (TE's core attention keeps FP8 scaling metadata,
our SDPA none). `ExtraStateSDPA` is our SDPA carrying extra state the way a TE module does, so a model
with it stands for a te model in what it asks of a checkpoint. Every loader goes through the same rule:
`load_model` (a whole model) and `load_base_weights` (a base checkpoint into a LoRA model).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model, save_model
from megatron_regdpo.models.lora import apply_lora, load_base_weights, lora_modules
from megatron_regdpo.models.wan.arch import SIZES
from megatron_regdpo.models.wan.attention import SDPAttention
from megatron_regdpo.models.wan.build import build_wan

META = {"family": "wan2.1"}


class ExtraStateSDPA(SDPAttention):
    """SDPA with FP8-metadata-like extra state, saved and restored through get/set_extra_state."""

    def get_extra_state(self):
        return getattr(self, "fp8_meta", torch.zeros(3))

    def set_extra_state(self, state):
        self.fp8_meta = state


def _with_extra_state(model, value=None):
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "core_attention", None), SDPAttention):
            m.core_attention.__class__ = ExtraStateSDPA
            if value is not None:
                m.core_attention.fp8_meta = value + n
            n += 1
    assert n
    return model


def _tensors(model):
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and "extra_state" not in k}


def _build(pg, seed, arch=SIZES["debug"]):
    torch.manual_seed(seed)
    return build_wan(arch, pg)


def _assert_same_weights(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_local_checkpoint_loads_into_a_model_with_extra_state(pg, tmp_path):
    local = _build(pg, 1)
    save_model(local, tmp_path / "ck", META)
    te_like = _with_extra_state(_build(pg, 2))
    sd = te_like.sharded_state_dict()
    assert any(k.endswith("core_attention._extra_state") for k in sd)  # it asks for what the checkpoint lacks
    load_model(te_like, tmp_path / "ck")
    _assert_same_weights(local, te_like)
    metas = [m.fp8_meta for m in te_like.modules() if isinstance(m, ExtraStateSDPA) and hasattr(m, "fp8_meta")]
    assert all(torch.equal(x, torch.zeros(3)) for x in metas)  # fresh extra state kept


def test_extra_state_checkpoint_loads_into_either_backend(pg, tmp_path):
    te_like = _with_extra_state(_build(pg, 3), value=torch.tensor([1.0, 2.0, 3.0]))
    save_model(te_like, tmp_path / "ck", META)
    local = _build(pg, 4)
    load_model(local, tmp_path / "ck")
    _assert_same_weights(te_like, local)
    again = _with_extra_state(_build(pg, 5))
    load_model(again, tmp_path / "ck")
    _assert_same_weights(te_like, again)
    want = [m.fp8_meta for m in te_like.modules() if isinstance(m, ExtraStateSDPA)]
    got = [m.fp8_meta for m in again.modules() if isinstance(m, ExtraStateSDPA)]
    assert len(got) == len(want) > 0
    for w, g in zip(want, got):
        assert torch.equal(w, g)  # the same backend gets its extra state back


def test_a_missing_tensor_is_still_an_error_naming_it(pg, tmp_path):
    t2v = _build(pg, 6)
    save_model(t2v, tmp_path / "ck", META)
    i2v = _build(pg, 7, dataclasses.replace(SIZES["debug"], image_dim=24, image_tokens=5))  # same shapes + image K/V
    with pytest.raises(ValueError, match=r"lacks 11 tensor\(s\) this model needs: condition.image_embedder"):
        load_model(i2v, tmp_path / "ck")


def _lora_te_like(pg, seed, arch=SIZES["debug"]):
    model = apply_lora(_with_extra_state(_build(pg, seed, arch)), 4, 8.0, seed=seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_()  # not the zeros they start as: "untouched" then means something
    return model


def test_local_base_checkpoint_loads_into_a_lora_model_with_extra_state(pg, tmp_path):
    local = _build(pg, 8)
    save_model(local, tmp_path / "base", META)
    te_like = _lora_te_like(pg, 9)
    adapters = {k: v.clone() for k, v in te_like.state_dict().items() if k.endswith(("lora_A", "lora_B"))}
    assert adapters
    load_base_weights(te_like, tmp_path / "base")
    base = {k: v for k, v in _tensors(te_like).items() if k not in adapters}
    assert base.keys() == _tensors(local).keys()
    for k, v in _tensors(local).items():
        assert torch.equal(base[k], v), k
    after = te_like.state_dict()
    for k, v in adapters.items():
        assert torch.equal(after[k], v), f"{k} changed by load_base_weights"
    metas = [m.fp8_meta for m in te_like.modules() if isinstance(m, ExtraStateSDPA) and hasattr(m, "fp8_meta")]
    assert metas and all(torch.equal(x, torch.zeros(3)) for x in metas)  # fresh extra state kept


def test_load_base_weights_names_a_missing_tensor(pg, tmp_path):
    save_model(_build(pg, 10), tmp_path / "t2v", META)
    i2v = _lora_te_like(pg, 11, dataclasses.replace(SIZES["debug"], image_dim=24, image_tokens=5))
    with pytest.raises(ValueError, match=r"lacks 11 tensor\(s\) this model needs: condition.image_embedder"):
        load_base_weights(i2v, tmp_path / "t2v")

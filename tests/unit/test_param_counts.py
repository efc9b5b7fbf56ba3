"""The named sizes have exactly the published parameter counts, and WanArch <-> diffusers config round-trips."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_regdpo.models.wan.arch import SIZES, WanArch
from megatron_regdpo.models.wan.build import build_wan, count_parameters

# parameter counts of the diffusers checkpoints Wan-AI/Wan2.1-{T2V-1.3B,T2V-14B,I2V-14B-720P}-Diffusers
PUBLISHED = {
    "1.3B": 1_418_996_800,
    "14B": 14_288_491_584,
    "14B-i2v": 16_394_878_784,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_named_size_matches_published_count(pg, name):
    arch = SIZES[name]
    with torch.device("meta"):
        ours = build_wan(arch, pg, init_weights=False)
    assert all(p.is_meta for p in ours.parameters())
    assert count_parameters(ours) == PUBLISHED[name]


@pytest.mark.parametrize("name", list(PUBLISHED) + ["debug"])
def test_count_matches_diffusers_model(pg, name):
    from diffusers import WanTransformer3DModel

    arch = SIZES[name]
    with torch.device("meta"):
        ours = build_wan(arch, pg, init_weights=False)
        ref = WanTransformer3DModel(**arch.diffusers_config())
    assert count_parameters(ours) == sum(p.numel() for p in ref.parameters())


def test_debug_i2v_count_matches_diffusers(pg):
    from diffusers import WanTransformer3DModel

    arch = dataclasses.replace(SIZES["debug"], image_dim=24, in_channels=36, image_tokens=5)
    ours = build_wan(arch, pg)
    ref = WanTransformer3DModel(**arch.diffusers_config())
    assert count_parameters(ours) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("name", list(SIZES))
def test_diffusers_config_round_trips(name):
    arch = SIZES[name]
    assert WanArch.from_diffusers_config(arch.diffusers_config()) == arch


def test_diffusers_config_round_trips_non_default_fields():
    arch = dataclasses.replace(SIZES["debug"], num_layers=3, num_heads=6, head_dim=12, ffn_dim=96,
                               out_channels=8, cross_attn_norm=False, eps=1e-5, rope_max_seq_len=512)
    assert WanArch.from_diffusers_config(arch.diffusers_config()) == arch


def test_diffusers_config_is_accepted_by_diffusers():
    from diffusers import WanTransformer3DModel

    for arch in SIZES.values():
        with torch.device("meta"):
            ref = WanTransformer3DModel(**arch.diffusers_config())
        # the config diffusers registers (with its own defaults filled in) reads back to the same arch
        assert WanArch.from_diffusers_config(dict(ref.config)) == arch


@pytest.mark.parametrize("qk_norm", ["rms_norm", "layer_norm", None])
def test_rejects_unsupported_qk_norm(qk_norm):
    cfg = SIZES["debug"].diffusers_config() | {"qk_norm": qk_norm}
    with pytest.raises(ValueError, match="qk_norm"):
        WanArch.from_diffusers_config(cfg)


def test_rejects_flf2v_pos_embed():
    cfg = SIZES["14B-i2v"].diffusers_config() | {"pos_embed_seq_len": 257 * 2}
    with pytest.raises(ValueError, match="pos_embed_seq_len"):
        WanArch.from_diffusers_config(cfg)


@pytest.mark.parametrize("image_dim,added", [(1280, None), (None, 5120), (1280, 1024)])
def test_rejects_inconsistent_image_layout(image_dim, added):
    cfg = SIZES["14B"].diffusers_config() | {"image_dim": image_dim, "added_kv_proj_dim": added}
    with pytest.raises(ValueError, match="image_dim"):
        WanArch.from_diffusers_config(cfg)

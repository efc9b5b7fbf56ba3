"""wan_forward_flops / wan_step_flops against torch.utils.flop_counter running the real model.

The counter counts mm/addmm/bmm/convolution (and SDPA kernels it knows) and no elementwise op, the same
rules as the formula, so the two must agree exactly. One catch, on CPU: F.scaled_dot_product_attention
dispatches to aten._scaled_dot_product_flash_attention_for_cpu, for which torch's counter (2.13) has no
formula and no decomposition, so it would count core attention as 0. Under the math backend SDPA
decomposes into two bmm ops (QK^T, AV) that the counter counts: an independent count of the core.
"""
from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from megatron_regdpo.models.wan.arch import SIZES
from megatron_regdpo.models.wan.build import build_wan
from megatron_regdpo.models.wan.flops import wan_forward_flops, wan_step_flops

T2V = SIZES["debug"]
I2V = dataclasses.replace(T2V, image_dim=24, in_channels=36, image_tokens=5)
T2V_PATCH222 = dataclasses.replace(T2V, num_heads=2, head_dim=24, patch=(2, 2, 2), out_channels=8)

# formula component -> the counter's module names that carry it
_LAYER = r"WanModel\.decoder\.layers\.\d+\."
COMPONENT_MODULES = {
    "self_attn_proj": _LAYER + r"self_attention\.linear_(qkv|proj)",
    "self_attn_core": _LAYER + r"self_attention\.core_attention",
    "cross_attn_proj": _LAYER + r"cross_attention\.linear_(q|kv|kv_img|proj)",
    "cross_attn_core": _LAYER + r"cross_attention\.core_attention",
    "ffn": _LAYER + r"mlp",
    "patch_embed": r"WanModel\.patch_embedding",
    "time_embed": r"WanModel\.condition\.(time_embedder|time_proj)",
    "text_embed": r"WanModel\.condition\.text_embedder",
    "image_embed": r"WanModel\.condition\.image_embedder",
    "head": r"WanModel\.proj_out",
}


@pytest.fixture(scope="module")
def model(pg):
    """model(arch, recompute="none"): build_wan's model, built once per (arch, recompute)."""
    return functools.cache(lambda arch, recompute="none": build_wan(arch, pg, recompute=recompute))


def _inputs(arch, batch, fhw, text_tokens):
    lat = torch.randn(batch, arch.in_channels, *fhw)
    img = torch.randn(batch, arch.image_tokens, arch.image_dim) if arch.task == "i2v" else None
    return lat, torch.rand(batch) * 1000, torch.randn(batch, text_tokens, arch.text_dim), img


class _TotalFlops(TorchDispatchMode):
    """FlopCounterMode's formulas without its module tracker, whose backward hooks cannot be attached
    to the views that megatron-core's full recompute makes under no_grad ("Expected gradient function
    to be set"). Checked against FlopCounterMode where both run."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
        return out

    def get_total_flops(self) -> int:
        return self.total


def _count(model, inputs, backward: bool, counter=None):
    counter = counter or FlopCounterMode(display=False, depth=None)
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = model(*inputs)
        if backward:
            out.square().mean().backward()
    return counter


CASES = [  # (arch, batch, latent (F, H, W), text tokens)
    (T2V, 1, (1, 4, 4), 7),        # a single frame
    (T2V, 2, (3, 4, 6), 5),        # odd frames, non-square
    (T2V, 1, (5, 6, 2), 3),
    (I2V, 1, (3, 6, 4), 4),
    (I2V, 2, (1, 2, 8), 6),
    (T2V_PATCH222, 2, (4, 4, 6), 5),  # temporal patch, out_channels != in_channels
]


@pytest.mark.parametrize("arch,batch,fhw,text_tokens", CASES)
def test_forward_matches_torch_counter_per_component(model, arch, batch, fhw, text_tokens):
    with torch.no_grad():
        counter = _count(model(arch), _inputs(arch, batch, fhw, text_tokens), backward=False)
    expected = wan_forward_flops(arch, batch, fhw, text_tokens)
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    measured = {comp: sum(v for name, v in per_module.items() if re.fullmatch(pattern, name))
                for comp, pattern in COMPONENT_MODULES.items()}
    assert measured == {k: v for k, v in expected.items() if k != "total"}
    assert counter.get_total_flops() == expected["total"] == sum(measured.values())


@pytest.mark.parametrize("arch,batch,fhw,text_tokens", [CASES[1], CASES[4]])
def test_backward_is_twice_forward_except_data_inputs(model, arch, batch, fhw, text_tokens):
    """Exactly: forward + backward = 3 * forward - (patch_embed + first text linear + first time linear).
    Every matmul's backward costs two matmuls of its size (input and weight gradient; bias gradients are
    sums, not counted), SDPA's math path included; the three whose input is data skip the input one."""
    counter = _count(model(arch), _inputs(arch, batch, fhw, text_tokens), backward=True)
    fwd = wan_forward_flops(arch, batch, fhw, text_tokens)
    d = arch.hidden
    data_input = fwd["patch_embed"] + 2 * batch * text_tokens * arch.text_dim * d + 2 * batch * arch.freq_dim * d
    assert counter.get_total_flops() == 3 * fwd["total"] - data_input
    step = wan_step_flops(arch, fhw, text_tokens, pairs=batch // 2, reference_forward=False)
    assert step["model"] == 3 * fwd["total"]


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_term_matches_torch_counter(model, recompute):
    """The extra work measured under recompute is exactly wan_step_flops' `recompute` term."""
    arch, fhw, text_tokens = I2V, (3, 4, 6), 5
    inputs = _inputs(arch, 2, fhw, text_tokens)
    base = _count(model(arch), inputs, backward=True).get_total_flops()
    assert _count(model(arch), inputs, backward=True, counter=_TotalFlops()).get_total_flops() == base
    with_recompute = _count(model(arch, recompute), inputs, True, counter=_TotalFlops()).get_total_flops()
    step = wan_step_flops(arch, fhw, text_tokens, pairs=1, reference_forward=False, recompute=recompute)
    assert with_recompute - base == step["recompute"] > 0


def test_step_accounting():
    fhw, t = (21, 60, 104), 512
    fwd = wan_forward_flops(SIZES["14B-i2v"], 8, fhw, t)
    step = wan_step_flops(SIZES["14B-i2v"], fhw, t, pairs=4, reference_forward=True, recompute="full")
    blocks = sum(fwd[k] for k in ("self_attn_proj", "self_attn_core", "cross_attn_proj", "cross_attn_core", "ffn"))
    assert step == {"model": 3 * fwd["total"], "reference": fwd["total"], "recompute": blocks,
                    "hardware": 4 * fwd["total"] + blocks}
    assert wan_step_flops(SIZES["1.3B"], fhw, t, pairs=1, reference_forward=False)["hardware"] == \
        3 * wan_forward_flops(SIZES["1.3B"], 2, fhw, t)["total"]
    assert sum(v for k, v in fwd.items() if k != "total") == fwd["total"]
    assert wan_forward_flops(SIZES["14B-i2v"], 8, fhw, t, image_tokens=257) == fwd


@pytest.mark.parametrize("call,match", [
    (lambda: wan_forward_flops(T2V, 1, (3, 5, 4), 4), "not divisible by the patch"),
    (lambda: wan_forward_flops(T2V, 1, (3, 4, 4), 4, image_tokens=257), "attends to exactly 0"),
    (lambda: wan_forward_flops(I2V, 1, (3, 4, 4), 4, image_tokens=257), "attends to exactly 5"),
    (lambda: wan_step_flops(T2V, (3, 4, 4), 4, pairs=1, reference_forward=True, recompute="block"), "recompute="),
    (lambda: wan_step_flops(T2V, (3, 4, 4), 4, pairs=0, reference_forward=True), "pairs=0"),
])
def test_user_mistakes_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()

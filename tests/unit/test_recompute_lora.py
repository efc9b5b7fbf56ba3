"""Recompute with LoRA: the adapters get the same gradients under none, selective and full recompute.

Regression: megatron-core's full recompute is a reentrant autograd Function whose output requires grad only
if an input does; with a frozen patch embedding (LoRA) no input did, so the adapters silently received no
gradient at all under `model.recompute=full` (found by the capacity planner: the step kept no activations).
"""
from __future__ import annotations

import pytest
import torch

from megatron_regdpo.config import load_config
from megatron_regdpo.models.lora import apply_lora, lora_modules
from megatron_regdpo.models.wan.arch import SIZES
from megatron_regdpo.models.wan.build import build_wan


def _grads(pg, recompute: str) -> dict:
    cfg = load_config("recipes/base/wan_debug.yaml", [f"model.recompute={recompute}"])
    torch.manual_seed(0)
    model = build_wan(SIZES["debug"], pg, parallel=cfg.parallel, recompute=recompute)
    apply_lora(model, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
    model.train()
    x, t, text = torch.randn(2, 16, 3, 4, 8, generator=g), 1000 * torch.rand(2, generator=g), torch.randn(2, 5, 32, generator=g)
    model(x, t, text).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_lora_gradients_survive_recompute(pg, recompute):
    want, got = _grads(pg, "none"), _grads(pg, recompute)
    assert want.keys() == got.keys() and len(want) > 0
    for name, grad in want.items():
        assert got[name] is not None, f"{name}: no gradient under model.recompute={recompute}"
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)

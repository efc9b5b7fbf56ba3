"""Activation offloading (parallel/offload.py): under full recompute each layer's saved hidden-states input
goes to host memory and comes back for its recompute; losses and gradients are bitwise those without it,
LoRA and full fine-tuning, fp32 and bf16."""
from __future__ import annotations

import gc

import pytest
import torch

from megatron_regdpo.config import load_config
from megatron_regdpo.models.lora import apply_lora
from megatron_regdpo.models.wan.arch import SIZES
from megatron_regdpo.models.wan.build import build_wan
from megatron_regdpo.parallel.offload import ActivationOffload


def _step(pg, offload: bool, lora: bool, dtype=torch.float32):
    cfg = load_config("recipes/base/wan_debug.yaml", ["model.recompute=full"])
    torch.manual_seed(0)
    model = build_wan(SIZES["debug"], pg, parallel=cfg.parallel, params_dtype=dtype, recompute="full")
    if lora:
        apply_lora(model, rank=4, alpha=8.0)
    layers = list(model.decoder.layers)
    off = ActivationOffload().attach(layers) if offload else None
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 16, 3, 4, 8, generator=g).to(dtype), 1000 * torch.rand(2, generator=g)
    text = torch.randn(2, 5, 32, generator=g).to(dtype)
    model.train()
    loss = model(x, t, text).float().square().mean()
    held = off.host_bytes if off else 0
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, off, held, len(layers)


@pytest.mark.parametrize("lora", [False, True], ids=["full_ft", "lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_offloading_is_bitwise_and_gives_every_byte_back(pg, lora, dtype):
    loss, grads, _, _, _ = _step(pg, False, lora, dtype)
    loss_o, grads_o, off, held, layers = _step(pg, True, lora, dtype)
    assert torch.equal(loss, loss_o)
    assert grads.keys() == grads_o.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(grad, grads_o[name]), name
    # one hidden-states input per layer went out ([S, B, D] tokens: 2 x 3*2*4 patches, D=64), all came back
    per_layer = 3 * 2 * 4 * 2 * SIZES["debug"].hidden * torch.finfo(dtype).bits // 8
    assert off.offloaded == layers and held == off.peak_host_bytes == layers * per_layer
    assert off.host_bytes == 0 and not off._order


def test_only_training_forwards_with_grad_are_offloaded_and_dropped_graphs_are_forgotten(pg):
    torch.manual_seed(0)
    model = build_wan(SIZES["debug"], pg, recompute="full")
    off = ActivationOffload().attach(model.decoder.layers)
    x, t, text = torch.randn(1, 16, 3, 4, 8), torch.tensor([500.0]), torch.randn(1, 5, 32)
    model.eval()
    model(x, t, text)
    model.train()
    with torch.no_grad():
        model(x, t, text)
    assert off.offloaded == 0
    out = model(x, t, text)
    assert off.offloaded == len(model.decoder.layers) and off.host_bytes > 0
    del out  # a forward whose backward never runs: its host copies go with its graph
    gc.collect()
    assert off.host_bytes == 0 and not off._order
    off.detach()
    model(x, t, text).sum().backward()
    assert off.offloaded == len(model.decoder.layers)

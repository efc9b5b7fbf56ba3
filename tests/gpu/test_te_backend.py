"""GPU only: the `te` spec (Transformer Engine linears + attention) computes what the `local` spec does,
forward and backward, in bf16 and FP8; a checkpoint converted from diffusers (always written by the local
backend) loads into a te model.

Skipped on machines without CUDA or without Transformer Engine (the `gpu` extra). Shapes satisfy TE's
FP8 rules (config/te_shapes.py): 320 tokens x 2 samples, 64 text and 8 image tokens x 2, widths % 16.
Figures go to docs/benchmarks.md with the card's name.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                       reason="needs Transformer Engine (pip install -e '.[gpu]')"),
]


def _arch(task):
    import dataclasses

    from megatron_regdpo.models.wan.arch import SIZES

    arch = dataclasses.replace(SIZES["debug"], num_heads=4, head_dim=64, ffn_dim=512)
    return dataclasses.replace(arch, image_dim=64, in_channels=36, image_tokens=8) if task == "i2v" else arch


def _pair(pg, task, tmp_path, fp8="none"):
    """A local model and a te model (FP8 as the trainer builds it) holding its weights through a checkpoint
    written by the local backend, as conversion from diffusers writes it (the te load path)."""
    from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model, save_model
    from megatron_regdpo.models.wan.build import build_wan

    arch = _arch(task)
    local = build_wan(arch, pg, params_dtype=torch.bfloat16, backend="local").cuda()
    save_model(local, tmp_path / "local_ckpt", {"family": "wan2.1"})
    te = build_wan(arch, pg, params_dtype=torch.bfloat16, backend="te", fp8=fp8, init_weights=False).cuda()
    load_model(te, tmp_path / "local_ckpt")
    return arch, local, te


def _inputs(arch):
    from megatron_regdpo.models.wan.convert import random_inputs

    x, t, txt, img = random_inputs(arch, latent=(5, 16, 16), text_len=64)
    return x.cuda().bfloat16(), t.cuda(), txt.cuda().bfloat16(), None if img is None else img.cuda().bfloat16()


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("fp8", ["none", "delayed"])
@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_te_forward_backward_matches_local(pg, task, fp8, tmp_path):
    arch, local, te = _pair(pg, task, tmp_path, fp8)
    inputs = _inputs(arch)
    local.train(), te.train()
    want = local(*inputs)
    want.float().square().mean().backward()
    got = te(*inputs)  # the te block enters TE's FP8 autocast itself (config.fp8)
    got.float().square().mean().backward()
    tol = 0.15 if fp8 != "none" else 2e-2  # FP8 (E4M3 forward, E5M2 gradients) against bf16
    print(f"{task} fp8={fp8}: te vs local output {_rel(got, want):.3e} on {torch.cuda.get_device_name()}")
    assert _rel(got, want) < tol
    grads = {n: p.grad for n, p in local.named_parameters() if p.grad is not None}
    for n, p in te.named_parameters():
        if n in grads:
            assert p.grad is not None, n
            assert _rel(p.grad, grads[n]) < 2 * tol, n


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_te_matches_local_bf16(pg, task):
    import dataclasses

    from megatron_regdpo.models.wan.arch import SIZES
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.models.wan.convert import random_inputs

    arch = dataclasses.replace(SIZES["debug"], num_heads=4, head_dim=64, ffn_dim=512)
    if task == "i2v":
        arch = dataclasses.replace(arch, image_dim=64, in_channels=36, image_tokens=9)
    local = build_wan(arch, pg, params_dtype=torch.bfloat16, backend="local").cuda().eval()
    te = build_wan(arch, pg, params_dtype=torch.bfloat16, backend="te", init_weights=False).cuda().eval()
    own = {k: v for k, v in local.state_dict().items() if not k.endswith("_extra_state")}
    te.load_state_dict(own, strict=False)
    x, t, txt, img = (None if a is None else a.cuda() for a in random_inputs(arch, latent=(5, 16, 16), text_len=64))
    with torch.no_grad():
        want = local(x.bfloat16(), t, txt.bfloat16(), None if img is None else img.bfloat16()).float()
        got = te(x.bfloat16(), t, txt.bfloat16(), None if img is None else img.bfloat16()).float()
    rel = ((got - want).norm() / want.norm()).item()
    print(f"{task}: te vs local bf16 relative error {rel:.3e} on {torch.cuda.get_device_name()}")
    assert rel < 2e-2


def test_fp8_training_steps_through_the_trainer(pg, tmp_path):
    """Two Reg-DPO steps of the debug model with the te backend and FP8 (delayed scaling) through the trainer,
    on the demo's tiny store (48 tokens x 2 samples, 16 text tokens x 2: TE's FP8 shapes hold)."""
    import importlib.util
    import json
    import math
    from pathlib import Path

    from megatron_regdpo.train import main

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("bench_throughput_tool", root / "tools" / "bench_throughput.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    store = tool.build_tiny_store(tmp_path / "store")
    out = tmp_path / "run"
    assert main(["--config", str(root / "recipes/debug/tiny_cpu.yaml"), f"data.store={store}", f"run.output_dir={out}",
                 "schedule.train_steps=2", "data.global_batch_pairs=1", "model.backend=te", "precision.fp8=delayed",
                 "precision.params_dtype=bf16"]) == 0
    lines = [json.loads(x) for x in (out / "tiny-cpu" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(math.isfinite(m["loss/total"]) and m["optim/skipped_steps"] == 0 for m in lines), lines

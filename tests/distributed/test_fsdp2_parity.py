"""FSDP2 (`parallel.fsdp`) computes what one rank computes with megatron-core DDP: over DP2, DP4, CP2 x DP2,
TP2 x DP2 (+SP), TP2 x CP2 (+SP) and PP2 x DP2, full fine-tuning and LoRA (frozen base), full recompute.
Compared: the loss and gradient norm of two steps, every gradient of the first step (gathered to full shape),
every trainable parameter after two clipped AdamW steps with weight decay; fp32, 1e-5 relative. The
clipping threshold is below the gradient norm, so the TP/PP-aware norm is exercised by the update too.
"""
from __future__ import annotations

import pytest

from _cases import make_payload
from _fsdp_cases import run_fsdp_case, run_fsdp_cases
from _harness import run_world

pytestmark = pytest.mark.distributed
RTOL = 1e-5
LORA = {"lora": True, "clip": 0.02}  # LoRA gradients are small: a lower threshold still clips

WORLD2 = {"DP2": {}, "DP2-LoRA": LORA, "DP2-recompute": {"recompute": "full"}}
WORLD4 = {"DP4": {}, "DP4-LoRA": LORA, "CP2xDP2": {"cp": 2}, "CP2xDP2-LoRA": {"cp": 2, **LORA},
          "TP2xDP2+SP": {"tp": 2, "sp": True}, "TP2xDP2+SP-LoRA": {"tp": 2, "sp": True, **LORA},
          "TP2xCP2+SP": {"tp": 2, "cp": 2, "sp": True}, "PP2xDP2": {"pp": 2}}


@pytest.fixture(scope="module")
def payload(pg):
    return {"t2v": make_payload("t2v")}


@pytest.fixture(scope="module")
def references(payload):
    """World-1 megatron-core DDP + megatron-core optimizer, for full fine-tuning and LoRA."""
    return {False: run_fsdp_case({}, payload["t2v"]), True: run_fsdp_case(LORA, payload["t2v"])}


def _run(world: int, layouts: dict, payload) -> dict:
    per_rank = run_world(world, run_fsdp_cases, {**payload, "layouts": [{**l, "fsdp": True} for l in layouts.values()]})
    return {name: [rank[i] for rank in per_rank] for i, name in enumerate(layouts)}


@pytest.fixture(scope="module")
def world2(payload):
    return _run(2, WORLD2, payload)


@pytest.fixture(scope="module")
def world4(payload):
    return _run(4, WORLD4, payload)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _check(ranks: list, ref: dict) -> None:
    for r in ranks:
        for name, values in (("loss", "losses"), ("gradient norm", "norms")):
            for step, (a, b) in enumerate(zip(r[values], ref[values])):
                assert abs(a - b) <= RTOL * abs(b), f"{name} of step {step + 1} on rank {r['coords']}: {a} vs {b}"
        for name, g in r["grads"].items():
            assert _rel(g, ref["grads"][name]) < RTOL, f"gradient of {name} on rank {r['coords']}"
        for name, p in r["params"].items():
            assert _rel(p, ref["params"][name]) < RTOL, f"{name} after two steps on rank {r['coords']}"
    # every trainable parameter is produced by some rank (pipeline stages hold their own layers)
    assert set().union(*(r["params"] for r in ranks)) == set(ref["params"])
    assert set().union(*(r["grads"] for r in ranks)) == set(ref["grads"])


def test_references_clip(references):
    """The thresholds are below the gradient norms: clipping (and so the norm) shapes the update."""
    assert references[False]["norms"][0] > 0.5 and references[True]["norms"][0] > LORA["clip"]


@pytest.mark.parametrize("name", list(WORLD2))
def test_world2_fsdp2_matches_single_rank(name, world2, references):
    _check(world2[name], references[bool(WORLD2[name].get("lora"))])


@pytest.mark.parametrize("name", list(WORLD4))
def test_world4_fsdp2_matches_single_rank(name, world4, references):
    _check(world4[name], references[bool(WORLD4[name].get("lora"))])

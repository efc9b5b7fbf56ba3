"""Every parallel layout computes what one rank computes: outputs, a non-linear per-sample loss, the
gradient of every parameter (gathered to full shape), and for DP one optimizer step.

Two spawned gloo worlds (2 and 4 ranks) run all their layouts in one go (spawning costs ~10 s per
world); the world-1 reference runs the same code in this process. Tolerance: fp32 round-off, 1e-5
relative to the largest magnitude of each compared tensor.
"""
from __future__ import annotations

import pytest
import torch

from _cases import make_payload, run_case, run_cases
from _harness import run_world

pytestmark = pytest.mark.distributed
RTOL = 1e-5

WORLD2 = {
    "TP2": {"tp": 2}, "TP2+SP": {"tp": 2, "sp": True}, "CP2": {"cp": 2}, "PP2": {"pp": 2},
    "DP2-distopt": {"dist_opt": True, "step": True}, "DP2": {"step": True},
    "I2V-TP2+SP": {"tp": 2, "sp": True, "task": "i2v"}, "I2V-CP2": {"cp": 2, "task": "i2v"},
    "I2V-PP2": {"pp": 2, "task": "i2v"},
}
WORLD4 = {
    "CP4": {"cp": 4}, "PP4": {"pp": 4}, "TP2xCP2": {"tp": 2, "cp": 2, "sp": True}, "TP2xPP2": {"tp": 2, "pp": 2},
    "CP2xDP2": {"cp": 2, "step": True}, "PP2xDP2": {"pp": 2, "step": True},
    "TP2xCP2-distopt": {"tp": 2, "cp": 2, "sp": True, "dist_opt": True, "step": True},
    "I2V-TP2xCP2": {"tp": 2, "cp": 2, "sp": True, "task": "i2v"},
}


@pytest.fixture(scope="module")
def payloads(pg):
    return {task: make_payload(task) for task in ("t2v", "i2v")}


@pytest.fixture(scope="module")
def references(payloads, tmp_path_factory):
    """World-1 results (with an optimizer step) and a TP1 checkpoint of the reference weights."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    refs = {task: run_case({"task": task, "step": True}, p) for task, p in payloads.items()}
    run_case({"task": "t2v", "save": str(ckpt / "tp1")}, payloads["t2v"])
    return refs, ckpt


def _run(world: int, layouts: dict, payloads, extra: dict | None = None) -> dict:
    cases = {**layouts, **(extra or {})}
    per_rank = run_world(world, run_cases, {**payloads, "layouts": list(cases.values())})
    return {name: [rank[i] for rank in per_rank] for i, name in enumerate(cases)}


@pytest.fixture(scope="module")
def world2(payloads):
    return _run(2, WORLD2, payloads)


@pytest.fixture(scope="module")
def world4(payloads, references):
    _, ckpt = references
    return _run(4, WORLD4, payloads, {
        "save@TP2xPP2": {"tp": 2, "pp": 2, "save": str(ckpt / "tp2pp2")},
        "load@TP2xPP2<-TP1": {"tp": 2, "pp": 2, "load": str(ckpt / "tp1")},
    })


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _check(ranks: list, ref: dict, layout: dict) -> None:
    seen_out, seen_grads = set(), set()
    for r in ranks:
        for pair, out in r["outputs"].items():
            assert _rel(out, ref["outputs"][pair]) < RTOL, f"output of pair {pair} on rank {r['coords']}"
            assert _rel(r["errs"][pair], ref["errs"][pair]) < RTOL, f"per-sample errors of pair {pair}"
            seen_out.add(pair)
        for pair, loss in r["losses"].items():
            assert abs(float(loss) - float(ref["losses"][pair])) <= RTOL * abs(float(ref["losses"][pair]))
        for name, g in r.get("grads", {}).items():
            assert g.shape == ref["grads"][name].shape, name
            assert _rel(g, ref["grads"][name]) < RTOL, f"grad of {name} on rank {r['coords']}: {_rel(g, ref['grads'][name]):.2e}"
            seen_grads.add(name)
        for name, p in r.get("params", {}).items():
            assert _rel(p, ref["params"][name]) < RTOL, f"{name} after one optimizer step"
    assert seen_out == set(ref["outputs"]), "every pair's output must be produced by some rank"
    if not layout.get("dist_opt"):
        assert seen_grads == set(ref["grads"]), f"no grad for {set(ref['grads']) - seen_grads}"
    if layout.get("step"):
        assert set().union(*(r["params"] for r in ranks)) == set(ref["params"])


@pytest.mark.parametrize("name", list(WORLD2))
def test_world2_layout_matches_single_rank(name, world2, references):
    refs, _ = references
    _check(world2[name], refs[WORLD2[name].get("task", "t2v")], WORLD2[name])


@pytest.mark.parametrize("name", list(WORLD4))
def test_world4_layout_matches_single_rank(name, world4, references):
    refs, _ = references
    _check(world4[name], refs[WORLD4[name].get("task", "t2v")], WORLD4[name])


def test_checkpoint_saved_at_tp1_loads_at_tp2xpp2(world4, references):
    refs, _ = references
    ranks = world4["load@TP2xPP2<-TP1"]
    assert set().union(*(r["outputs"] for r in ranks)) == set(refs["t2v"]["outputs"])
    for r in ranks:
        for pair, out in r["outputs"].items():
            assert _rel(out, refs["t2v"]["outputs"][pair]) < RTOL


def test_checkpoint_saved_at_tp2xpp2_loads_at_tp1(world4, payloads, references):
    refs, ckpt = references
    back = run_case({"task": "t2v", "load": str(ckpt / "tp2pp2")}, payloads["t2v"])
    for pair, out in back["outputs"].items():
        assert torch.equal(out, refs["t2v"]["outputs"][pair]) or _rel(out, refs["t2v"]["outputs"][pair]) < RTOL

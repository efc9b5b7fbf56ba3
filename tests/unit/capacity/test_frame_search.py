"""max_frames on a stand-in plan whose peak grows with the frame count: the same answer with or without a
hint, and a right hint costs two plans (the 14B table's rows are re-searched from their last answer)."""
from __future__ import annotations

import types

import pytest

from megatron_regdpo.capacity import planner
from megatron_regdpo.config import load_config

GiB = 2**30


@pytest.fixture
def linear_plan(monkeypatch):
    calls = []

    def plan(cfg, world_size):   # 1 GiB per latent frame, 10 GiB of resident state
        latent = (cfg.data.frames - 1) // 4 + 1
        calls.append(latent)
        return types.SimpleNamespace(peak=(10 + latent) * GiB, host_peak=2 * latent * GiB)  # + offloaded inputs

    monkeypatch.setattr(planner, "plan", plan)
    return calls


@pytest.mark.parametrize("hint", [None, 40, 50, 60, 1])
def test_hint_changes_the_cost_not_the_answer(linear_plan, hint):
    cfg = load_config("recipes/debug/tiny_cpu.yaml", [])
    found = planner.max_frames(cfg, 1, planner.Budget(60.5, 0.0), hint=hint)   # 50 latent frames fit
    assert found.frames == 4 * 49 + 1 and found.over_frames == 4 * 50 + 1
    if hint == 50:
        assert linear_plan == [50, 51]


def test_host_memory_budget_binds_too(linear_plan):
    """Offloaded activations grow with the clip in host memory: the budget's host share limits the answer."""
    cfg = load_config("recipes/debug/tiny_cpu.yaml", [])
    found = planner.max_frames(cfg, 1, planner.Budget(60.5, 0.0, host_gib=60.0))   # 30 latent frames: 60 GiB
    assert found.frames == 4 * 29 + 1 and found.over_frames == 4 * 30 + 1

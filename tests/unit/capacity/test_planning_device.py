"""The planner simulates on the device megatron-core allocates on: CPU here, CUDA on a GPU host (where a
plan on "cpu" mixed megatron's CUDA buffers with CPU tensors)."""
from __future__ import annotations

import pytest
import torch

from megatron_regdpo.capacity import planner
from megatron_regdpo.config import load_config


def test_planning_device_follows_cuda_availability(monkeypatch):
    assert planner.planning_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert planner.planning_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert planner.planning_device() == "cpu"


class _Stop(Exception):
    pass


def test_plan_simulates_every_rank_on_the_planning_device(monkeypatch):
    cfg = load_config("recipes/debug/tiny_cpu.yaml", ["parallel.pp=2"])
    seen = []

    def record(cfg, world_size, rank, **kwargs):
        seen.append((rank, kwargs.get("device")))
        raise _Stop  # the device choice is what is checked; the simulation itself is tested elsewhere

    monkeypatch.setattr(planner, "simulate_step", record)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(_Stop):
        planner.plan(cfg, 2)
    assert seen == [(0, "cuda")]

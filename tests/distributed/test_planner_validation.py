"""The capacity planner against measured memory: real steps on spawned gloo ranks under torch's profiler
(CPU allocator totals) vs the fake-tensor plan of the same config and rank, within 10% (FSDP2: 5%).

Cases (megatron_regdpo/experiments/planner_check.py): one rank, full fine-tuning with a resident reference; one
rank, LoRA with full recompute (where the plan once exposed adapters left without gradients, and a frozen
linear's strided backward); two ranks, TP2 + sequence parallelism, bf16, selective recompute; two ranks, FSDP2 (parallel.fsdp) full
fine-tuning with the resident reference sharded like the policy; one rank with activation offloading (device and
host memory are one pool on a CPU: the plan counts both). tools/validate_planner.py runs all of them.
"""
from __future__ import annotations

import pytest

from megatron_regdpo.experiments.planner_check import SMALL, VALIDATION_CASES, validate_config
from megatron_regdpo.config import load_config

pytestmark = pytest.mark.distributed


CASES = (0, 1, 2, 8, 11)


@pytest.mark.parametrize("case", CASES, ids=[VALIDATION_CASES[i][0] for i in CASES])
def test_plan_within_10_percent_of_measured_peak(case):
    name, world, overrides = VALIDATION_CASES[case]
    cfg = load_config("recipes/base/wan_debug.yaml", [*SMALL, *overrides])
    results = validate_config(cfg, world)
    assert [r["rank"] for r in results] == list(range(world))
    for r in results:
        assert r["measured"]["step"] > 10 * 2**20                    # a real step was measured, not noise
        assert r["unsettled_collectives"] == 0                      # no gloo worker outlived a call's tensors
        for kind in ("step", "whole_run"):
            tolerance = 0.05 if "FSDP2" in name else 0.10
            assert abs(r["rel_error"][kind]) <= tolerance, (name, r["rank"], kind, r["measured"], r["planned"])
        # the tracker on the real run and the fake plan agree to a few bytes (the fake world's gradient-norm
        # shim makes a scalar or two differently): fake tensors change no bookkeeping. (The real run's
        # collectives are settled: a gloo worker freeing a buffer after its caller moved the peak by that
        # buffer in some runs, parallel/collective_wrap.py.) Except when the peak
        # is in the optimizer step: it branches on data the fake step cannot read (the gradient norm, inf
        # checks) and the fake step takes the costlier branch, so there the plan may only be higher
        for kind in ("step", "whole_run"):
            diff = r["planned"][kind] - r["tracked_real"][kind]
            assert (diff >= -64) if r["planned_peak_phase"] == "optimizer" else abs(diff) <= 64, (name, kind, diff)

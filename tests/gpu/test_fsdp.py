"""FSDP2 (parallel.fsdp) on GPUs: the CPU suite (tests/distributed/test_fsdp2_parity.py) proves the layouts
on gloo; here the same cases run with NCCL, one GPU per rank, against one rank."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def own_world():
    """A one-rank world for this module only, torn down after it: test_planner_gpu.py, next in the session,
    needs a process without a distributed world (not the session-wide `pg`, which stays up)."""
    from megatron_regdpo.parallel.groups import distributed_session

    with distributed_session(world_size=1) as pg:
        yield pg


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 over NCCL needs 2 CUDA GPUs (one per rank); "
                    "the one-GPU FSDP2 step is in the GPU check (make gpu-check)")
def test_fsdp2_matches_single_rank_on_gpus(own_world):
    from _cases import make_payload
    from _fsdp_cases import run_fsdp_case, run_fsdp_cases

    from megatron_regdpo.parallel.spawn import run_world

    payload = make_payload("t2v")
    ref = run_fsdp_case({}, payload)
    ranks = run_world(2, run_fsdp_cases, {"t2v": payload, "layouts": [{"fsdp": True}]})
    for r in ranks:
        for name, p in r[0]["params"].items():
            assert ((p - ref["params"][name]).abs().max() / ref["params"][name].abs().max()) < 1e-5, name

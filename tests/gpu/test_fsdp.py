"""Megatron-FSDP (parallel.fsdp) is GPU-only: on CPU wrapping fails with a clear message; with two or
more GPUs the FSDP2 layout is checked against one rank like every other layout."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))

FSDP = SimpleNamespace(tp=1, pp=1, cp=1, sequence_parallel=False, virtual_pp=None, fsdp=True,
                       distributed_optimizer=False, grad_reduce_in_fp32=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error; GPUs run the real test below")
def test_fsdp_on_cpu_is_a_clear_error(pg):
    from megatron_regdpo.models.wan.arch import SIZES
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.parallel.data_parallel import wrap_data_parallel

    model = build_wan(SIZES["debug"], pg)
    with pytest.raises(ValueError, match="needs CUDA GPUs"):
        wrap_data_parallel(model, FSDP, pg)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="FSDP2 parity needs 2 CUDA GPUs (Megatron-FSDP has no CPU path; NCCL needs one GPU per rank)")
def test_fsdp2_matches_single_rank():
    from _cases import make_payload, run_case, run_cases  # noqa: F401  (spawned with nccl on 2 GPUs)
    from megatron_regdpo.parallel.spawn import run_world

    payload = make_payload("t2v")
    ref = run_case({"task": "t2v", "step": True}, payload)
    ranks = run_world(2, run_cases, {"t2v": payload, "layouts": [{"fsdp": True, "step": True}]})
    for r in ranks:
        for name, p in r[0]["params"].items():
            assert ((p - ref["params"][name]).abs().max() / ref["params"][name].abs().max()) < 1e-5, name

"""GPU only: the capacity planner's plan of the 1.3B model against torch.cuda.max_memory_allocated of the
same step run for real on one GPU (local backend: megatron linears + SDPA, whose CUDA kernels are
FlashAttention's). Record the figures in docs/benchmarks.md with the card's name."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_plan_within_10_percent_of_cuda_peak_1_3b(recompute):
    import torch.distributed as dist

    from megatron_regdpo.experiments.planner_check import measure_cuda_step
    from megatron_regdpo.config import load_config

    if dist.is_initialized():
        pytest.skip("the planner's fake world needs a process without a distributed world (run this file alone)")
    cfg = load_config("recipes/wan1.3b/regdpo_t2v_h100x8.yaml",
                      ["parallel.distributed_optimizer=false", "data.global_batch_pairs=1", "data.frames=33",
                       f"model.recompute={recompute}", "lora.rank=16", "objective.reference.mode=lora_base"])
    result = measure_cuda_step(cfg)
    print(result)
    assert abs(result["rel_error"]) <= 0.10, result

"""FSDP2 (parallel.fsdp) runs in the planner's fake world: a small config on 4 fake ranks shards the weights,
the optimizer state, the gradients and the resident reference by the data-parallel size, with nothing
modelled; the units' gathered weights come and go during the step."""
from __future__ import annotations

import pytest

from megatron_regdpo.capacity.simulate import simulate_step
from megatron_regdpo.config import load_config

DEBUG = ("data.global_batch_pairs=4", "data.frames=17", "data.height=64", "data.width=64")


def _plans(rank: int, world: int, payload) -> tuple:
    """In a process of its own: the fake world needs one without torch.distributed (the session's tests
    keep a one-rank world up)."""
    ddp = simulate_step(load_config("recipes/base/wan_debug.yaml", list(DEBUG)), 4, granule=1)
    fsdp = simulate_step(load_config("recipes/base/wan_debug.yaml", [*DEBUG, "parallel.fsdp=true"]), 4, granule=1)
    return ddp, fsdp


@pytest.fixture(scope="module")
def plans():
    from megatron_regdpo.parallel.spawn import run_world

    (result,) = run_world(1, _plans, None)
    return result


def _about_a_quarter(sharded: int, whole: int) -> bool:
    return whole / 4 <= sharded <= 1.1 * whole / 4   # dim 0 padded to a multiple of the 4 ranks


def test_weights_optimizer_reference_sharded_by_dp(plans):
    ddp, fsdp = plans
    assert not fsdp.simulated_as and not fsdp.notes          # run as configured, nothing modelled
    for category in ("weights", "optimizer", "reference"):  # fp32 model: params are the masters
        assert _about_a_quarter(fsdp.static[category], ddp.static[category]), category
    assert fsdp.static["grads"] < 64                         # no gradient buffer between steps


def test_gradients_are_sharded_shards_during_the_step(plans):
    ddp, fsdp = plans
    # reduce-scattered in the post-backward: at the update only this rank's shard of each gradient is live
    assert _about_a_quarter(fsdp.phase_breakdowns["optimizer"]["grads"], ddp.static["grads"])
    # the policy's units are gathered in the forward/backward and freed after use: at the peak (in the
    # backward) the step's activations hold the layer computing and the prefetched next one, whole, beyond DDP's
    extra, layer = fsdp.breakdown["activations"] - ddp.breakdown["activations"], ddp.sizes["layer_weight_bytes"]
    assert 2 * layer <= extra < 3 * layer
    assert fsdp.peak < ddp.peak

"""The negative sampler's flow-matching solvers on a Gaussian, where the ODE is solved exactly.

Data x0 ~ N(mu, s^2): the marginal at sigma is N((1-sigma) mu, std(sigma)^2), std^2 = (1-sigma)^2 s^2 + sigma^2,
and the probability-flow ODE keeps z = (x - (1-sigma) mu) / std(sigma) fixed, so its velocity is known.
The solvers run on the diffusers grids (schedules.py) in float64 here, the model's "timestep" being sigma.
(Equality with diffusers' pipelines: test_negatives_diffusers.py.)
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_regdpo.data.negatives import FlowScheduler, Schedule, guided, keyed_noise, sample, shifted_sigmas

MU, S = 0.7, 0.3


def _std(sigma):
    return math.sqrt((1 - sigma) ** 2 * S * S + sigma * sigma)


def _velocity(x, sigma):
    z = (x - (1 - sigma) * MU) / _std(sigma)
    return -MU + (sigma - (1 - sigma) * S * S) / _std(sigma) * z


def _velocity_t(x, t):
    return _velocity(x, t.item())  # these schedules give sigma itself as the timestep


def _schedule(kind, steps, shift=1.0, drop_last=False):
    """The diffusers grid of `kind` in float64 (timestep = sigma); without the final jump to 0 if drop_last."""
    sig = FlowScheduler(kind=kind, shift=shift).schedule(steps).sigmas.double()
    sig = sig[:-1] if drop_last else sig
    return Schedule(kind, sig, sig[:-1], FlowScheduler(kind="unipc") if kind == "unipc" else None)


def _error(solver, steps, noise):
    """Max error at the last non-zero sigma (the final jump to sigma=0 is first order by design)."""
    sch = _schedule(solver, steps, drop_last=True)
    s0, s1 = sch.sigmas[0].item(), sch.sigmas[-1].item()
    exact = (1 - s1) * MU + _std(s1) * (noise - (1 - s0) * MU) / _std(s0)
    return (sample(_velocity_t, noise, sch).double() - exact).abs().max().item()


def test_shifted_sigmas():
    sig = shifted_sigmas(10, 5.0)
    assert len(sig) == 11 and sig[-1] == 0.0 and 0.999 < sig[0] < 1.0
    assert all(a > b for a, b in zip(sig, sig[1:]))
    t = 0.5 * (1 - 1 / 1000)                                  # Wan's shift formula at the middle step
    assert sig[5] == pytest.approx(5 * t / (1 + 4 * t))
    with pytest.raises(ValueError, match="shift"):
        shifted_sigmas(10, 0.0)


def test_euler_is_first_order_and_unipc_much_more_accurate():
    noise = torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    e20, e40 = _error("euler", 20, noise), _error("euler", 40, noise)
    assert 1.5 < e20 / e40 < 2.5                             # halving the step halves the error
    u20, u40 = _error("unipc", 20, noise), _error("unipc", 40, noise)
    assert u40 < e40 / 10 and u40 < u20 / 4                   # higher order: at least 4x per halving


def test_full_schedule_lands_on_the_data_distribution():
    """The last step jumps to the data prediction E[x0 | x] (as Wan's sampler does), which shrinks the spread
    by s (1 - sigma) / std(sigma) at the last sigma: ~1% at shift 1, ~10% at Wan's shift 5 with 30 steps."""
    noise = torch.randn(4000, generator=torch.Generator().manual_seed(1))
    for solver in ("euler", "unipc"):
        x0 = sample(_velocity_t, noise.double(), _schedule(solver, 30))
        assert x0.mean().item() == pytest.approx(MU, abs=0.02) and x0.std().item() == pytest.approx(S, abs=0.02)


def test_classifier_free_guidance_combination():
    v = guided(lambda x, t, cond: x + (1.0 if cond else 0.0), 5.0)
    assert v(torch.zeros(2), 0.5).tolist() == [5.0, 5.0]      # v_u + g (v_c - v_u) = 0 + 5 * 1
    calls = []
    no_cfg = guided(lambda x, t, cond: calls.append(cond) or x, 1.0)
    no_cfg(torch.zeros(1), 0.5)
    assert calls == [True]                                     # guidance 1: no unconditional pass


def test_keyed_noise_depends_on_seed_clip_and_index_only():
    a = keyed_noise((2, 3), 0, "clip", 0)
    assert torch.equal(a, keyed_noise((2, 3), 0, "clip", 0))
    assert not torch.equal(a, keyed_noise((2, 3), 0, "clip", 1))
    assert not torch.equal(a, keyed_noise((2, 3), 1, "clip", 0))
    with pytest.raises(ValueError, match="solver"):
        sample(_velocity_t, a, [1.0, 0.0], "heun")

"""Flow matching (Wan's shifted schedule) and the keyed RNG that makes noise agree everywhere."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_regdpo.objectives.flow_matching import (
    FlowMatchingSettings, key_seed, make_pair_batch, model_timestep, noisy_latent, pair_noise, pair_timestep,
    shift_sigma, split_pair, stack_pair, velocity_target,
)

SHAPE = (4, 3, 2, 5)  # C, F, H, W of one latent


def _latents(P, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(P, *SHAPE, generator=g, dtype=dtype), torch.randn(P, *SHAPE, generator=g, dtype=dtype)


# ---- formulas -----------------------------------------------------------------------------------------------

def test_shift_formula_and_identity():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(t, 1.0), t, rtol=0, atol=0)
    sigma = shift_sigma(t, 5.0)
    torch.testing.assert_close(sigma, 5 * t / (1 + 4 * t))
    assert sigma[0] == 0 and sigma[-1] == 1 and bool((sigma.diff() > 0).all())
    assert shift_sigma(0.5, 5.0) == pytest.approx(2.5 / 3)
    assert bool((sigma[1:-1] > t[1:-1]).all())  # shift > 1 moves mass towards noise
    with pytest.raises(ValueError, match="-1"):
        shift_sigma(t, -1.0)


def test_noising_target_and_timestep():
    x0, eps = _latents(3)
    zero, one = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(noisy_latent(x0, eps, zero), x0)
    torch.testing.assert_close(noisy_latent(x0, eps, one), eps)
    # the target is the velocity d x_t / d sigma (x_t is linear in sigma)
    sigma = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    dx = noisy_latent(x0, eps, sigma + 1e-3) - noisy_latent(x0, eps, sigma)
    torch.testing.assert_close(dx / 1e-3, velocity_target(x0, eps))
    assert model_timestep(0.25) == 250.0


def test_settings_validation():
    with pytest.raises(ValueError, match="'cosine'"):
        FlowMatchingSettings(timestep_sampling="cosine")
    with pytest.raises(ValueError, match="0.0"):
        FlowMatchingSettings(shift=0.0)
    with pytest.raises(ValueError, match="-1"):
        FlowMatchingSettings(logit_std=-1)


# ---- keyed RNG ----------------------------------------------------------------------------------------------

def test_key_is_pinned_across_processes_and_versions():
    # Pinned: a change here silently changes every resumed run's noise. torch's CPU generator is
    # deterministic for a seed, so these numbers are also what any other process computes.
    assert key_seed(0, 0, 0, 0) == 8269990589975321033
    assert key_seed(1234, 10, 42, 1, "timestep") == 3364017704436706682
    torch.testing.assert_close(pair_noise(1234, 10, 42, (4,)),
                               torch.tensor([-1.402024507522583, 0.2600944936275482, 0.3642694652080536,
                                             0.0012110489187762141]))
    assert pair_timestep(1234, 10, 42) == pytest.approx(0.5193873410041201, abs=1e-15)


def test_same_key_same_values_different_keys_differ():
    a = pair_noise(7, 3, 11, SHAPE)
    torch.testing.assert_close(pair_noise(7, 3, 11, SHAPE), a, rtol=0, atol=0)
    for other in [(8, 3, 11, 0), (7, 4, 11, 0), (7, 3, 12, 0), (7, 3, 11, 1)]:
        assert not torch.equal(pair_noise(*other[:3], SHAPE, draw=other[3]), a), other
        assert pair_timestep(*other) != pair_timestep(7, 3, 11, 0), other
    # noise and timestep are separate streams of one key
    assert key_seed(7, 3, 11, 0, "noise") != key_seed(7, 3, 11, 0, "timestep")
    with pytest.raises(ValueError, match="-1"):
        key_seed(-1, 0, 0)
    with pytest.raises(ValueError, match="pair_id must be an integer, got 2.5"):
        key_seed(0, 0, 2.5)
    assert key_seed(0, 0, torch.tensor(7)) == key_seed(0, 0, 7)
    with pytest.raises(ValueError, match="'dropout'"):
        key_seed(0, 0, 0, stream="dropout")


def test_noise_dtype_and_device_agree():
    # drawn on CPU in float32, then cast: a bf16 or GPU run sees the same numbers
    ref = pair_noise(1, 2, 3, SHAPE)
    torch.testing.assert_close(pair_noise(1, 2, 3, SHAPE, dtype=torch.bfloat16), ref.to(torch.bfloat16),
                               rtol=0, atol=0)
    assert pair_noise(1, 2, 3, SHAPE, dtype=torch.float64).dtype == torch.float64


def test_timestep_distributions():
    uniform = torch.tensor([pair_timestep(0, 0, i) for i in range(2000)])
    assert 0 <= float(uniform.min()) and float(uniform.max()) < 1
    assert float(uniform.mean()) == pytest.approx(0.5, abs=0.03)
    ln = FlowMatchingSettings(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    logit = torch.logit(torch.tensor([pair_timestep(0, 0, i, settings=ln) for i in range(2000)], dtype=torch.float64))
    assert float(logit.mean()) == pytest.approx(0.5, abs=0.08)
    assert float(logit.std()) == pytest.approx(0.8, abs=0.05)


# ---- pair batches -------------------------------------------------------------------------------------------

def test_pair_batch_layout_and_shared_noise():
    x0_w, x0_l = _latents(3)
    b = make_pair_batch(x0_w, x0_l, [5, 9, 2], seed=1, step=4)
    assert b.x_t_BCFHW.shape == (6, *SHAPE) and b.x_t_BCFHW.dtype == torch.float64
    sigma = b.sigma_P.reshape(-1, 1, 1, 1, 1)
    for x0_P, x_t_P, v_P in zip((x0_w, x0_l), split_pair(b.x_t_BCFHW), split_pair(b.target_BCFHW)):
        eps = v_P + x0_P  # v = eps - x0
        torch.testing.assert_close(x_t_P, (1 - sigma) * x0_P + sigma * eps)
    # winner and loser share eps and t
    eps_w, eps_l = split_pair(b.target_BCFHW + stack_pair(x0_w, x0_l))
    torch.testing.assert_close(eps_w, eps_l, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_w[1], pair_noise(1, 4, 9, SHAPE, dtype=torch.float64))
    torch.testing.assert_close(b.sigma_P, shift_sigma(b.t_P, 5.0))
    t_w, t_l = split_pair(b.timestep_B)
    torch.testing.assert_close(t_w, t_l, rtol=0, atol=0)
    torch.testing.assert_close(t_w, (1000 * b.sigma_P).float())


def test_pair_batch_independent_of_batch_order_and_composition():
    x0_w, x0_l = _latents(2)
    ab = make_pair_batch(x0_w, x0_l, [3, 7], seed=0, step=1)
    ba = make_pair_batch(x0_w.flip(0), x0_l.flip(0), torch.tensor([7, 3]), seed=0, step=1)
    alone = make_pair_batch(x0_w[1:], x0_l[1:], [7], seed=0, step=1)
    ab_w, ab_l = split_pair(ab.x_t_BCFHW)
    ba_w, ba_l = split_pair(ba.x_t_BCFHW)
    torch.testing.assert_close(ab_w, ba_w.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(ab_l, ba_l.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(ab_w[1:], split_pair(alone.x_t_BCFHW)[0], rtol=0, atol=0)
    assert not torch.equal(ab.x_t_BCFHW, make_pair_batch(x0_w, x0_l, [3, 7], seed=0, step=2).x_t_BCFHW)


def test_pair_batch_bf16_and_shift_one():
    x0_w, x0_l = _latents(1, dtype=torch.bfloat16)
    b = make_pair_batch(x0_w, x0_l, [0], seed=0, step=0, settings=FlowMatchingSettings(shift=1.0))
    assert b.x_t_BCFHW.dtype == torch.bfloat16 and b.timestep_B.dtype == torch.float32
    torch.testing.assert_close(b.sigma_P, b.t_P)
    eps = pair_noise(0, 0, 0, SHAPE)
    s = float(b.sigma_P)
    torch.testing.assert_close(b.x_t_BCFHW[0], ((1 - s) * x0_w[0].float() + s * eps).bfloat16())
    assert math.isclose(float(b.timestep_B[0]), 1000 * s, rel_tol=1e-6)


def test_pair_batch_errors():
    x0_w, x0_l = _latents(2)
    with pytest.raises(ValueError, match="1 pair ids for 2"):
        make_pair_batch(x0_w, x0_l, [1], seed=0, step=0)
    with pytest.raises(ValueError, match=r"\(1, 4, 3, 2, 5\)"):
        make_pair_batch(x0_w, x0_l[:1], [1, 2], seed=0, step=0)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        split_pair(torch.zeros(3))

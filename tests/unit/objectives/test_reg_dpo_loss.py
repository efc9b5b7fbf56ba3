"""The Reg-DPO loss against a hand-written float64 reference; its variants, metrics and normalisation."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_regdpo.objectives.reg_dpo import (
    RegDPOSettings, normalize_loss_sum, reg_dpo_loss, reg_dpo_metrics,
)

METRIC_NAMES = {
    "loss/total", "loss/dpo", "loss/sft", "dpo/s", "dpo/dgr", "dpo/r", "dpo/win_gap", "dpo/lose_gap",
    "dpo/implicit_acc", "dpo/reward_margin", "err_pol_w", "err_pol_l", "err_ref_w", "err_ref_l",
}


def _errs(P=4, seed=0, scale=1e-3):
    """Errors near 1 whose s lands where the log-sigmoid is curved at beta 500 (beta_eff * s ~ 1)."""
    g = torch.Generator().manual_seed(seed)
    ref_w, ref_l = 1 + torch.rand(2, P, generator=g, dtype=torch.float64)
    pol_w = (ref_w + scale * torch.randn(P, generator=g, dtype=torch.float64)).requires_grad_()
    pol_l = (ref_l + scale * torch.randn(P, generator=g, dtype=torch.float64)).requires_grad_()
    return pol_w, pol_l, ref_w, ref_l


def _reference(pol_w, pol_l, ref_w, ref_l, beta, convention="diffusion_dpo", dpo_weight=1.0, mode="dgr",
               weight=1.0):
    """Per pair, in plain Python floats: the paper's formulas written out once more."""
    beta_eff = beta / 2 if convention == "diffusion_dpo" else beta
    total = 0.0
    for pw, pl, rw, rl in zip(pol_w.tolist(), pol_l.tolist(), ref_w.tolist(), ref_l.tolist()):
        s = (pw - rw) - (pl - rl)
        l_dpo = math.log1p(math.exp(beta_eff * s))  # -log sigmoid(-x) = log(1 + e^x)
        dgr = beta_eff / (1 + math.exp(-beta_eff * s))
        r = {"dgr": dgr, "constant": weight, "dgr_scaled": weight * dgr}[mode]
        total += dpo_weight * l_dpo + r * pw
    return total / len(pol_w)


@pytest.mark.parametrize("kw", [
    dict(beta=500.0),
    dict(beta=500.0, beta_convention="raw"),
    dict(beta=50.0, dpo_weight=0.3, sft_mode="constant", sft_weight=125.0),
    dict(beta=500.0, sft_mode="dgr_scaled", sft_weight=0.5),
])
def test_loss_matches_float64_reference(kw):
    errs = _errs()
    out = reg_dpo_loss(*errs, RegDPOSettings(**kw))
    ref = _reference(*errs, beta=kw["beta"], convention=kw.get("beta_convention", "diffusion_dpo"),
                     dpo_weight=kw.get("dpo_weight", 1.0), mode=kw.get("sft_mode", "dgr"),
                     weight=kw.get("sft_weight", 1.0))
    assert out.num_pairs == 4
    assert out.loss_sum.item() / out.num_pairs == pytest.approx(ref, rel=1e-12)
    assert out.beta_eff == (kw["beta"] if kw.get("beta_convention") == "raw" else kw["beta"] / 2)


def test_initial_dgr_is_half_beta_eff():
    # policy == reference at the start: s = 0, DGR = beta_eff / 2 = 125 for beta 500 (the paper's figure)
    e = torch.rand(3, dtype=torch.float64)
    out = reg_dpo_loss(e.clone().requires_grad_(), e.clone().requires_grad_(), e, e)
    torch.testing.assert_close(out.dgr_P, torch.full((3,), 125.0, dtype=torch.float64))
    assert float(out.dpo_P[0]) == pytest.approx(math.log(2))


def test_r_zero_is_vanilla_dpo():
    pol_w, pol_l, ref_w, ref_l = _errs()
    out = reg_dpo_loss(pol_w, pol_l, ref_w, ref_l, RegDPOSettings(sft_mode="constant", sft_weight=0.0))
    s = (pol_w - ref_w) - (pol_l - ref_l)
    vanilla = -torch.nn.functional.logsigmoid(-250.0 * s).sum()
    torch.testing.assert_close(out.loss_sum, vanilla)
    g = torch.autograd.grad(out.loss_sum, (pol_w, pol_l))
    torch.testing.assert_close(g, torch.autograd.grad(vanilla, (pol_w, pol_l)))


def test_dpo_weight_zero_is_sft_on_winners():
    pol_w, pol_l, ref_w, ref_l = _errs()
    out = reg_dpo_loss(pol_w, pol_l, ref_w, ref_l, RegDPOSettings(dpo_weight=0.0, sft_mode="constant", sft_weight=2.0))
    torch.testing.assert_close(out.loss_sum, 2.0 * pol_w.sum())
    g_w, g_l = torch.autograd.grad(out.loss_sum, (pol_w, pol_l), allow_unused=True)
    torch.testing.assert_close(g_w, torch.full_like(pol_w, 2.0))
    assert g_l is None or bool((g_l == 0).all())


def test_dgr_is_detached():
    # With dpo_weight 0 and r = DGR, L = sum DGR * err_pol_w. If DGR carried a gradient, err_pol_l (inside s)
    # would get one and err_pol_w's would differ from DGR.
    pol_w, pol_l, ref_w, ref_l = _errs()
    out = reg_dpo_loss(pol_w, pol_l, ref_w, ref_l, RegDPOSettings(dpo_weight=0.0))
    assert not out.dgr_P.requires_grad and not out.r_P.requires_grad
    g_w, g_l = torch.autograd.grad(out.loss_sum, (pol_w, pol_l), allow_unused=True)
    torch.testing.assert_close(g_w, out.dgr_P)
    assert g_l is None or bool((g_l == 0).all())
    # while the DPO term's own gradient is DGR * ds (dL_dpo/ds = DGR)
    out = reg_dpo_loss(pol_w, pol_l, ref_w, ref_l, RegDPOSettings(sft_mode="constant", sft_weight=0.0))
    g_w, g_l = torch.autograd.grad(out.loss_sum, (pol_w, pol_l))
    torch.testing.assert_close(g_w, out.dgr_P)
    torch.testing.assert_close(g_l, -out.dgr_P)


def test_metrics_names_and_values():
    pol_w, pol_l, ref_w, ref_l = _errs()
    settings = RegDPOSettings(dpo_weight=0.5, sft_mode="dgr_scaled", sft_weight=2.0)
    out = reg_dpo_loss(pol_w, pol_l, ref_w, ref_l, settings)
    m = reg_dpo_metrics(out)
    assert set(m) == METRIC_NAMES and all(type(v) is float for v in m.values())
    s = ((pol_w - ref_w) - (pol_l - ref_l)).detach()
    dgr = 250 * torch.sigmoid(250 * s)
    l_dpo = torch.nn.functional.softplus(250 * s)
    expect = {
        "loss/total": out.loss_sum.item() / 4, "loss/dpo": l_dpo.mean(), "loss/sft": (2 * dgr * pol_w).mean(),
        "dpo/s": s.mean(), "dpo/dgr": dgr.mean(), "dpo/r": 2 * dgr.mean(),
        "dpo/win_gap": (pol_w - ref_w).mean(), "dpo/lose_gap": (pol_l - ref_l).mean(),
        "dpo/implicit_acc": (s < 0).double().mean(), "dpo/reward_margin": (-250 * s).mean(),
        "err_pol_w": pol_w.mean(), "err_pol_l": pol_l.mean(), "err_ref_w": ref_w.mean(), "err_ref_l": ref_l.mean(),
    }
    for k, v in expect.items():
        assert m[k] == pytest.approx(v.item() if torch.is_tensor(v) else v, rel=1e-10, abs=1e-15), k
    assert m["loss/total"] == pytest.approx(0.5 * m["loss/dpo"] + m["loss/sft"], rel=1e-12)
    assert 0 < m["dpo/implicit_acc"] < 1  # the fixture has pairs on both sides


def test_normalisation_two_microbatches_equal_one():
    pol_w, pol_l, ref_w, ref_l = _errs(P=2)
    one = normalize_loss_sum(reg_dpo_loss(pol_w, pol_l, ref_w, ref_l).loss_sum,
                             pairs_per_microbatch=2, num_microbatches=1, dp_size=1)
    two = sum(normalize_loss_sum(reg_dpo_loss(pol_w[i:i + 1], pol_l[i:i + 1], ref_w[i:i + 1], ref_l[i:i + 1]).loss_sum,
                                 pairs_per_microbatch=1, num_microbatches=2, dp_size=1) for i in range(2))
    torch.testing.assert_close(one, two)
    torch.testing.assert_close(torch.autograd.grad(one, (pol_w, pol_l)), torch.autograd.grad(two, (pol_w, pol_l)))


@pytest.mark.parametrize("grad_reduction", ["sum", "mean"])
def test_normalisation_over_microbatches_and_dp(grad_reduction):
    """dp=2 ranks x 2 micro-batches x 1 pair: the step gradient must be that of the mean over all 4 pairs.

    "sum": the trainer adds the normalised micro-batch losses and SUMS gradients over DP ranks.
    "mean": megatron-core's default: the schedule divides each micro-batch loss by num_microbatches and DDP
    AVERAGES gradients over DP ranks (CP ranks would multiply by cp and divide by cp: no net change).
    """
    pol_w, pol_l, ref_w, ref_l = _errs(P=4)
    full = reg_dpo_loss(pol_w, pol_l, ref_w, ref_l).loss_sum / 4
    want = torch.autograd.grad(full, (pol_w, pol_l))
    M, dp = 2, 2
    grads, losses = [], []
    for rank in range(dp):
        step_loss = 0.0
        for mb in range(M):
            i = rank * M + mb
            sl = slice(i, i + 1)
            loss = normalize_loss_sum(reg_dpo_loss(pol_w[sl], pol_l[sl], ref_w[sl], ref_l[sl]).loss_sum,
                                      pairs_per_microbatch=1, num_microbatches=M, dp_size=dp,
                                      grad_reduction=grad_reduction)
            step_loss = step_loss + (loss / M if grad_reduction == "mean" else loss)  # what the schedule does
        losses.append(step_loss)
        grads.append(torch.autograd.grad(step_loss, (pol_w, pol_l)))
    reduce = (lambda xs: sum(xs) / dp) if grad_reduction == "mean" else sum  # what DDP does
    torch.testing.assert_close(reduce(losses), full)
    for k in range(2):
        torch.testing.assert_close(reduce([g[k] for g in grads]), want[k])


def test_user_errors():
    with pytest.raises(ValueError, match="'dpo'"):
        RegDPOSettings(beta_convention="dpo")
    with pytest.raises(ValueError, match="'dgr2'"):
        RegDPOSettings(sft_mode="dgr2")
    with pytest.raises(ValueError, match="-1"):
        RegDPOSettings(beta=-1)
    with pytest.raises(ValueError, match="-0.5"):
        RegDPOSettings(dpo_weight=-0.5)
    with pytest.raises(ValueError, match="sft_weight=2.0 has no effect"):
        RegDPOSettings(sft_mode="dgr", sft_weight=2.0)
    pol_w, pol_l, ref_w, ref_l = _errs()
    with pytest.raises(ValueError, match="err_ref_w requires grad"):
        reg_dpo_loss(pol_w, pol_l, ref_w.clone().requires_grad_(), ref_l)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        reg_dpo_loss(pol_w, pol_l[:3], ref_w, ref_l)
    with pytest.raises(ValueError, match="'avg'"):
        normalize_loss_sum(torch.tensor(1.0), pairs_per_microbatch=1, num_microbatches=1, dp_size=1,
                           grad_reduction="avg")
    with pytest.raises(ValueError, match="dp_size must be an integer >= 1, got 0"):
        normalize_loss_sum(torch.tensor(1.0), pairs_per_microbatch=1, num_microbatches=1, dp_size=0)


def test_stable_for_large_beta_s():
    e = torch.ones(2, dtype=torch.float64)
    pol_w = torch.tensor([50.0, -50.0], dtype=torch.float64, requires_grad=True)  # beta_eff * s = +-12500
    out = reg_dpo_loss(pol_w, e.clone().requires_grad_(), e, e, RegDPOSettings())
    assert torch.isfinite(out.loss_sum)
    assert torch.isfinite(torch.autograd.grad(out.loss_sum, pol_w)[0]).all()

"""The Reg-DPO loss (Du et al. 2025) on per-sample flow-matching errors: Diffusion-DPO plus an SFT term.

Legend: P pairs in this micro-batch; every per-pair tensor ends in _P. err_* are per-sample MEAN squared
errors of the velocity (see per_sample.py), policy (pol) or reference (ref), winner (w) or loser (l).

    s       = (err_pol_w - err_ref_w) - (err_pol_l - err_ref_l)       < 0 when the policy prefers the winner
    beta_eff = beta / 2 ("diffusion_dpo", Diffusion-DPO's code and the paper's DGR of ~125 at beta 500) or beta
    L_dpo   = -log sigmoid(-beta_eff * s)
    DGR     = beta_eff * sigmoid(beta_eff * s) = dL_dpo/ds             (the "DPO gradient ratio")
    r       = DGR (detached) | sft_weight | sft_weight * DGR (detached)
    L       = mean over pairs of  dpo_weight * L_dpo + r * err_pol_w

r = 0 gives vanilla Diffusion-DPO; dpo_weight = 0 gives SFT on the winners. DGR enters r as a constant: the
paper treats r as a per-pair weight, and a gradient through it would add a term the paper does not have.

Normalisation: `reg_dpo_loss` returns the SUM over this micro-batch's pairs and their count; the mean over
the whole step (all micro-batches, all data-parallel ranks) is made by `normalize_loss_sum` (see there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BETA_CONVENTIONS = ("diffusion_dpo", "raw")
SFT_MODES = ("dgr", "constant", "dgr_scaled")


@dataclass(frozen=True)
class RegDPOSettings:
    """Mirrors the loss fields of config.schema.ObjectiveConfig (this module imports only torch)."""

    beta: float = 500.0
    beta_convention: str = "diffusion_dpo"  # diffusion_dpo: beta_eff = beta / 2 | raw: beta_eff = beta
    dpo_weight: float = 1.0
    sft_mode: str = "dgr"                   # dgr: r = DGR | constant: r = sft_weight | dgr_scaled: sft_weight*DGR
    sft_weight: float = 1.0

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.beta_convention not in BETA_CONVENTIONS:
            raise ValueError(f"beta_convention must be one of {BETA_CONVENTIONS}, got {self.beta_convention!r}")
        if self.sft_mode not in SFT_MODES:
            raise ValueError(f"sft_mode must be one of {SFT_MODES}, got {self.sft_mode!r}")
        if not self.dpo_weight >= 0:
            raise ValueError(f"dpo_weight must be >= 0, got {self.dpo_weight}")
        if not self.sft_weight >= 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.sft_mode == "dgr" and self.sft_weight != 1.0:
            # A weight that silently does nothing is a bug waiting in a recipe.
            raise ValueError(f"sft_weight={self.sft_weight} has no effect with sft_mode='dgr' (r = DGR); "
                             f"use sft_mode='dgr_scaled' to scale the DGR")

    @property
    def beta_eff(self) -> float:
        return self.beta / 2 if self.beta_convention == "diffusion_dpo" else self.beta


@dataclass
class RegDPOOutput:
    loss_sum: torch.Tensor  # 0-d, SUM over this micro-batch's pairs, carries the graph
    num_pairs: int
    beta_eff: float
    dpo_weight: float
    # per pair, detached, for metrics
    s_P: torch.Tensor
    dgr_P: torch.Tensor
    r_P: torch.Tensor
    dpo_P: torch.Tensor  # L_dpo, before dpo_weight
    sft_P: torch.Tensor  # r * err_pol_w
    err_pol_w_P: torch.Tensor
    err_pol_l_P: torch.Tensor
    err_ref_w_P: torch.Tensor
    err_ref_l_P: torch.Tensor


def sft_coefficient(dgr_P: torch.Tensor, settings: RegDPOSettings) -> torch.Tensor:
    """r per pair, always detached."""
    dgr_P = dgr_P.detach()
    if settings.sft_mode == "dgr":
        return dgr_P
    if settings.sft_mode == "dgr_scaled":
        return settings.sft_weight * dgr_P
    return torch.full_like(dgr_P, settings.sft_weight)


def _check(err_pol_w_P, err_pol_l_P, err_ref_w_P, err_ref_l_P):
    named = dict(err_pol_w=err_pol_w_P, err_pol_l=err_pol_l_P, err_ref_w=err_ref_w_P, err_ref_l=err_ref_l_P)
    shapes = {k: tuple(v.shape) for k, v in named.items()}
    if len(set(shapes.values())) != 1 or err_pol_w_P.ndim != 1 or err_pol_w_P.numel() == 0:
        raise ValueError(f"expected four per-pair errors of one shape [P], P >= 1; got {shapes}")
    for k in ("err_ref_w", "err_ref_l"):
        if named[k].requires_grad:
            raise ValueError(f"{k} requires grad: compute the reference errors under torch.no_grad() "
                             f"(a graph through the reference only costs memory)")


def reg_dpo_loss(err_pol_w_P: torch.Tensor, err_pol_l_P: torch.Tensor, err_ref_w_P: torch.Tensor,
                 err_ref_l_P: torch.Tensor, settings: RegDPOSettings = RegDPOSettings()) -> RegDPOOutput:
    """The Reg-DPO loss summed over this micro-batch's pairs, plus the per-pair terms for metrics."""
    _check(err_pol_w_P, err_pol_l_P, err_ref_w_P, err_ref_l_P)
    beta_eff = settings.beta_eff
    s_P = (err_pol_w_P - err_ref_w_P) - (err_pol_l_P - err_ref_l_P)
    dpo_P = -F.logsigmoid(-beta_eff * s_P)  # stable for |beta_eff * s| in the thousands
    dgr_P = (beta_eff * torch.sigmoid(beta_eff * s_P)).detach()
    r_P = sft_coefficient(dgr_P, settings)
    sft_P = r_P * err_pol_w_P
    loss_sum = (settings.dpo_weight * dpo_P + sft_P).sum()
    d = lambda x: x.detach()  # noqa: E731
    return RegDPOOutput(loss_sum=loss_sum, num_pairs=err_pol_w_P.numel(), beta_eff=beta_eff,
                        dpo_weight=settings.dpo_weight, s_P=d(s_P), dgr_P=dgr_P, r_P=r_P, dpo_P=d(dpo_P),
                        sft_P=d(sft_P), err_pol_w_P=d(err_pol_w_P), err_pol_l_P=d(err_pol_l_P),
                        err_ref_w_P=d(err_ref_w_P), err_ref_l_P=d(err_ref_l_P))


def reg_dpo_metrics(out: RegDPOOutput) -> dict[str, float]:
    """Pair means over this micro-batch, as Python floats (one host sync for all of them).

    loss/total = dpo_weight * loss/dpo + loss/sft; loss/dpo is L_dpo before dpo_weight; loss/sft is r * err_pol_w.
    dpo/win_gap = err_pol_w - err_ref_w (should go negative), dpo/lose_gap the same on losers (should go
    positive). dpo/implicit_acc: share of pairs with s < 0. dpo/reward_margin = -beta_eff * s, the implicit
    reward of the winner minus that of the loser (Diffusion-DPO's "inside term"); > 0 when the winner is
    preferred. Micro-batches of equal size: the trainer averages these over micro-batches and DP ranks.
    """
    per_pair = {
        "loss/total": out.dpo_weight * out.dpo_P + out.sft_P,
        "loss/dpo": out.dpo_P,
        "loss/sft": out.sft_P,
        "dpo/s": out.s_P,
        "dpo/dgr": out.dgr_P,
        "dpo/r": out.r_P,
        "dpo/win_gap": out.err_pol_w_P - out.err_ref_w_P,
        "dpo/lose_gap": out.err_pol_l_P - out.err_ref_l_P,
        "dpo/implicit_acc": (out.s_P < 0).to(out.s_P.dtype),
        "dpo/reward_margin": -out.beta_eff * out.s_P,
        "err_pol_w": out.err_pol_w_P,
        "err_pol_l": out.err_pol_l_P,
        "err_ref_w": out.err_ref_w_P,
        "err_ref_l": out.err_ref_l_P,
    }
    means = torch.stack([v.to(torch.float64).mean() for v in per_pair.values()]).tolist()
    return dict(zip(per_pair, means))


def normalize_loss_sum(loss_sum: torch.Tensor, *, pairs_per_microbatch: int, num_microbatches: int,
                       dp_size: int, grad_reduction: str = "sum") -> torch.Tensor:
    """Scale one micro-batch's loss SUM so the step's gradient is that of the mean over ALL its pairs.

    global_pairs = pairs_per_microbatch * num_microbatches * dp_size (pairs in one optimizer step).

    grad_reduction="sum" (the convention this package assumes): the trainer calls backward on the returned
      value of every micro-batch (gradients add up) and SUMS gradients over the data-parallel and CP ranks.
      Returns loss_sum / global_pairs; the sum over micro-batches and DP ranks of these values is the step's
      mean loss. In megatron-core this is `calculate_per_token_loss=True` (DDP then scales by 1, a sum over
      dp x cp; the schedule leaves a 3-tuple loss alone); there one may instead return
      (loss_sum, num_pairs on CP rank 0 else 0, metrics) and let finalize_model_grads divide by the
      all-reduced count: the count must be reported once per CP group, or it is counted cp times.
    grad_reduction="mean": megatron-core's default (`calculate_per_token_loss=False`, a 2-tuple from the loss
      function): the schedule multiplies the loss by the CP size and divides it by num_microbatches, and DDP
      AVERAGES gradients over dp x cp ranks. Returns loss_sum * num_microbatches * dp_size / global_pairs
      (= loss_sum / pairs_per_microbatch), which the framework turns into the same step mean.
    Either way CP ranks each hold the same full loss (errors reduced by per_sample_sq_err) and partial
    parameter gradients, which the gradient SUM over CP completes.
    """
    for name, v in (("pairs_per_microbatch", pairs_per_microbatch), ("num_microbatches", num_microbatches),
                    ("dp_size", dp_size)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    global_pairs = pairs_per_microbatch * num_microbatches * dp_size
    if grad_reduction == "sum":
        return loss_sum / global_pairs
    if grad_reduction == "mean":
        return loss_sum * (num_microbatches * dp_size) / global_pairs
    raise ValueError(f"grad_reduction must be 'sum' or 'mean', got {grad_reduction!r}")

"""Flow-matching solvers for the negatives: diffusers' FlowMatchEuler and UniPC (flow prediction), step for step.

Convention (Wan2.1, rectified flow): x_sigma = (1 - sigma) x0 + sigma eps, the model predicts the velocity
v = eps - x0 given timestep t (schedules.py: what the diffusers pipeline passes), the data prediction is
x0 = x - sigma v. A schedule's sigmas end at 0 (or sigma_min), where x is the sample.

Euler: x <- x + (sigma' - sigma) v, cast to the model output's dtype after each step (as the scheduler does).
UniPC (Zhao et al. 2023; diffusers' UniPCMultistepScheduler with predict_x0): in the (alpha, sigma) =
(1 - sigma, sigma) parameterisation, a multistep predictor (UniP, order <= solver_order, lowered for the
first steps and, with lower_order_final, the last) and a corrector (UniC) that refines the current sample
with the model output just computed there (no extra evaluation). All coefficients are computed from the
float32 sigmas with 0-dim tensor arithmetic in the scheduler's order, so our samples match the pipeline's to
fp32 rounding (tests/unit/data/test_negatives_diffusers.py), not only to the method's accuracy.

Pure torch: no model code here. Legend: any tensor shape; B batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .schedules import KINDS, Schedule

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, timestep) -> model output


def guided(velocity: Callable, guidance: float) -> Velocity:
    """CFG with two forwards, `velocity(x, t, cond: bool)`: v_u + g (v_c - v_u) in the model's dtype (as the
    pipeline combines them); as the pipeline, guidance <= 1 runs the conditional forward only."""
    if guidance <= 1.0:
        return lambda x, t: velocity(x, t, True)

    def v(x, t):
        v_c = velocity(x, t, True)
        v_u = velocity(x, t, False)
        return v_u + guidance * (v_c - v_u)
    return v


def sample(velocity: Velocity, noise: torch.Tensor, schedule: Schedule | Sequence[float],
           solver: str | None = None) -> torch.Tensor:
    """Integrate from `noise` at sigmas[0] to sigmas[-1]; returns the sample (float32; float64 noise stays).

    `schedule` is normally FlowScheduler(...).schedule(steps); a plain list of sigmas (ending in 0) with
    `solver` gives timesteps = 1000 sigma (custom grids, e.g. tests on an analytic ODE)."""
    if not isinstance(schedule, Schedule):
        schedule = Schedule.from_sigmas(schedule, solver or "unipc")
    elif solver is not None and solver != schedule.kind:
        raise ValueError(f"solver {solver!r} given with a {schedule.kind!r} schedule")
    x = noise if noise.dtype == torch.float64 else noise.float()
    if schedule.kind == "euler":
        return _euler(velocity, x, schedule).to(x.dtype)
    if schedule.kind == "unipc":
        return _unipc(velocity, x, schedule)
    raise ValueError(f"solver {schedule.kind!r} is not one of {KINDS}")


def _euler(velocity, x, sch: Schedule):
    for i, t in enumerate(sch.timesteps):
        v = velocity(x, t)
        x = (x.to(sch.sigmas.dtype) + (sch.sigmas[i + 1] - sch.sigmas[i]) * v).to(v.dtype)
    return x


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    """log-SNR lambda = log(alpha / sigma), alpha = 1 - sigma (+inf at sigma 0)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def _coefficients(sigmas, s0: int, t: int, earlier: list[int], order: int, bh2: bool):
    """alpha_t, sigma_t / sigma_s0, h phi_1(h), B(h), the ratios r_k of the earlier points and the b vector
    of UniPC for data prediction stepping from sigma index s0 to t."""
    sig_t, sig_s0 = sigmas[t], sigmas[s0]
    lam_s0 = _lam(sig_s0)
    h = _lam(sig_t) - lam_s0
    rks = [(_lam(sigmas[k]) - lam_s0) / h for k in earlier]
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh) if bh2 else hh
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return 1 - sig_t, sig_t / sig_s0, h_phi_1, b_h, rks, b


def _vandermonde(rks: list, n: int) -> torch.Tensor:
    """R[i, k] = r_k^i for the ratios (and r = 1 for the newest point), n x n."""
    r = torch.stack([*rks, torch.ones((), dtype=rks[0].dtype if rks else torch.float32)])[:n]
    return torch.stack([torch.pow(r, i) for i in range(n)])


def _unipc(velocity, x, sch: Schedule):
    opts, sig = sch.unipc, sch.sigmas
    bh2 = opts.solver_type == "bh2"
    preds: list[torch.Tensor] = []   # data predictions at the last solver_order points, newest last
    last_x, last_order = None, 0
    for i, t in enumerate(sch.timesteps):
        m_t = x - sig[i] * velocity(x, t)
        if last_x is not None and (i - 1) not in opts.disable_corrector:  # UniC at point i
            x = _corrector(sig, i, last_x, preds, m_t, last_order, bh2)
        preds = (preds + [m_t])[-opts.solver_order:]
        order = min(opts.solver_order, sch.steps - i) if opts.lower_order_final else opts.solver_order
        order = min(order, len(preds))  # warm-up: as many points as there are
        last_x, last_order = x, order
        x = _predictor(sig, i, x, preds, order, bh2)
    return x


def _predictor(sig, i, x, preds, order, bh2):
    """UniP: from x at sigma index i to i + 1 with the last `order` data predictions."""
    earlier = [i - k for k in range(1, order)]
    alpha_t, ratio, h_phi_1, b_h, rks, b = _coefficients(sig, i, i + 1, earlier, order, bh2)
    m0 = preds[-1]
    x_t = ratio * x - alpha_t * h_phi_1 * m0
    if order == 1:
        return x_t.to(x.dtype)
    d1s = [(preds[-(k + 1)] - m0) / rk for k, rk in enumerate(rks, start=1)]
    rhos = [torch.ones((), dtype=x.dtype) * 0.5] if order == 2 else \
        torch.linalg.solve(_vandermonde(rks, order)[:-1, :-1], torch.stack(b)[:-1]).to(x.dtype).unbind()
    res = sum(rho * d for rho, d in zip(rhos, d1s))
    return (x_t - alpha_t * b_h * res).to(x.dtype)


def _corrector(sig, i, last_x, preds, m_t, order, bh2):
    """UniC of `order` at sigma index i: step again from last_x at i - 1 using m_t, the output at i."""
    earlier = [i - 1 - k for k in range(1, order)]
    alpha_t, ratio, h_phi_1, b_h, rks, b = _coefficients(sig, i - 1, i, earlier, order, bh2)
    m0 = preds[-1]
    x_t = ratio * last_x - alpha_t * h_phi_1 * m0
    if order == 1:
        rhos = [torch.ones((), dtype=last_x.dtype) * 0.5]
    else:
        rhos = torch.linalg.solve(_vandermonde(rks, order), torch.stack(b)).to(last_x.dtype).unbind()
    d1s = [(preds[-(k + 1)] - m0) / rk for k, rk in enumerate(rks, start=1)]
    res = sum(rho * d for rho, d in zip(rhos[:-1], d1s)) if d1s else 0
    return (x_t - alpha_t * b_h * (res + rhos[-1] * (m_t - m0))).to(last_x.dtype)

"""Flow-matching samplers for the negatives: Euler and a UniPC-style 2nd-order multistep, Wan's shift, CFG.

Convention (Wan2.1, rectified flow): x_sigma = (1 - sigma) x0 + sigma eps, velocity v = eps - x0, so the
ODE is dx/dsigma = v and the data prediction is x0 = x - sigma v. The model takes timestep = 1000 sigma.
Schedule as Wan's FlowUniPC: t from 1 - 1/1000 down to 0 in `steps` steps, sigma = shift t / (1 + (shift - 1) t).

UniPC (Zhao et al. 2023; diffusers' UniPCMultistepScheduler, bh2, data prediction) in the (alpha, sigma) =
(1 - sigma, sigma) parameterisation: a predictor using the last two data predictions and a corrector that
reuses the model output at the new point (no extra evaluation); first and last steps are first order.

Pure torch: no model code here. Legend: any tensor shape; B batch.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from megatron_regdpo.objectives.flow_matching import shift_sigma

NUM_TRAIN_TIMESTEPS = 1000
SOLVERS = ("euler", "unipc")


def shifted_sigmas(steps: int, shift: float) -> list[float]:
    """steps + 1 sigmas from ~1 down to exactly 0."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if shift <= 0:
        raise ValueError(f"shift={shift} must be positive")
    t_max = 1.0 - 1.0 / NUM_TRAIN_TIMESTEPS
    ts = [t_max * (1 - i / steps) for i in range(steps + 1)]
    return [shift_sigma(t, shift) for t in ts]


def guided(velocity: Callable, guidance: float) -> Callable:
    """v(x, sigma) with classifier-free guidance: v_u + g (v_c - v_u); `velocity(x, sigma, cond: bool)`."""
    if guidance == 1.0:
        return lambda x, sigma: velocity(x, sigma, True)

    def v(x, sigma):
        v_c, v_u = velocity(x, sigma, True), velocity(x, sigma, False)
        return v_u + guidance * (v_c - v_u)
    return v


def sample(velocity: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor, sigmas: list[float],
           solver: str = "unipc") -> torch.Tensor:
    """Integrate from `noise` at sigmas[0] to sigmas[-1] = 0; returns x0 (float32)."""
    if solver == "euler":
        return _euler(velocity, noise.float(), sigmas)
    if solver == "unipc":
        return _unipc(velocity, noise.float(), sigmas)
    raise ValueError(f"solver {solver!r} is not one of {SOLVERS}")


def _euler(velocity, x, sigmas):
    for s, s_next in zip(sigmas, sigmas[1:]):
        x = x + (s_next - s) * velocity(x, s).float()
    return x


def _lam(sigma: float) -> float:
    """log-SNR lambda = log(alpha / sigma), alpha = 1 - sigma."""
    return math.log(1 - sigma) - math.log(sigma)


def _coefficients(h: float, order: int) -> tuple[float, float, list[float]]:
    """h phi_1, B(h) (bh2) and the b vector of UniPC for data prediction (hh = -h)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    b_h = math.expm1(hh)
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, b


def _unipc(velocity, x, sigmas):
    steps = len(sigmas) - 1
    x0_preds: list[torch.Tensor] = []  # data predictions at the visited points
    last_x, last_order = None, 0
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        m_t = x - s * velocity(x, s).float()
        if last_x is not None:  # UniC: correct x with the model output at x itself
            x = _corrector(last_x, x0_preds, m_t, sigmas[i - 1], s, sigmas[i - 2] if i >= 2 else None, last_order)
        x0_preds = (x0_preds + [m_t])[-2:]
        order = 1 if (i == 0 or i == steps - 1) else 2  # warm-up and lower-order final step
        last_x, last_order = x, order
        if s_next == 0:  # the last step lands on the data prediction
            x = m_t
            continue
        x = _predictor(x, x0_preds, s, s_next, sigmas[i - 1] if order == 2 else None)
    return x


def _predictor(x, preds, s0, t, s_prev):
    """UniP: from x at s0 (data predictions preds[-1] at s0, preds[-2] at s_prev) to sigma t."""
    h = _lam(t) - _lam(s0)
    h_phi_1, b_h, _ = _coefficients(h, 2 if s_prev is not None else 1)
    alpha_t = 1 - t
    x_t = (t / s0) * x - alpha_t * h_phi_1 * preds[-1]
    if s_prev is not None:
        rk = (_lam(s_prev) - _lam(s0)) / h
        d1 = (preds[-2] - preds[-1]) / rk
        x_t = x_t - alpha_t * b_h * 0.5 * d1
    return x_t


def _corrector(last_x, preds, m_t, s0, t, s_prev, order):
    """UniC of order `order` at sigma t, stepping again from last_x at s0 with the new output m_t."""
    m0 = preds[-1]
    h = _lam(t) - _lam(s0)
    h_phi_1, b_h, b = _coefficients(h, order)
    alpha_t = 1 - t
    x_t = (t / s0) * last_x - alpha_t * h_phi_1 * m0
    d1_t = m_t - m0
    if order == 1:
        return x_t - alpha_t * b_h * 0.5 * d1_t
    rk = (_lam(s_prev) - _lam(s0)) / h
    d1 = (preds[-2] - m0) / rk
    rhos = torch.linalg.solve(torch.tensor([[1.0, 1.0], [rk, 1.0]], dtype=torch.float64),
                              torch.tensor(b, dtype=torch.float64)).tolist()
    return x_t - alpha_t * b_h * (rhos[0] * d1 + rhos[1] * d1_t)

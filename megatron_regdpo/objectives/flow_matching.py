"""Flow matching as Wan2.1 trains, with noise and timestep drawn from keyed RNG.

Legend: P pairs in the micro-batch; B = 2P samples (winners, then losers); C latent channels; F latent
frames; H, W latent height and width. The code is generic over the trailing dims, the names are the usual case.

    x_t = (1 - sigma) * x0 + sigma * eps         (sigma = 0: clean latent, sigma = 1: pure noise)
    v   = eps - x0                               (the velocity the DiT regresses: d x_t / d sigma)
    sigma = shift * t / (1 + (shift - 1) * t)    (Wan's shifted schedule; shift = 1 is the identity)
    timestep = 1000 * sigma                      (the number the DiT's time embedding sees)

Keyed RNG: every (seed, step, pair_id, draw) names its own torch.Generator, seeded by a blake2b hash of the
packed integers (never Python's hash(), which is salted per process). So every rank, a resumed run and a
batch in any order or composition get the same noise and timestep for a pair, with no communication. Noise
and timestep use separate hash domains, so they are independent streams of the same key.

Noise is drawn on the CPU in float32 and then cast and moved: CPU and GPU runs, and bf16 and fp32 runs, see
the same numbers (a CUDA generator would give different ones). The cost is one host-to-device copy of one
latent per pair, small next to a DiT forward.

Pair layout: winners and losers are STACKED on the batch dim, [w_0 .. w_{P-1}, l_0 .. l_{P-1}], so one
forward runs both and `split_pair` returns two contiguous views. Winner and loser of a pair share eps and t
(as in Diffusion-DPO's code): their errors then differ only through the clip, not through the noise draw.
"""
from __future__ import annotations

import hashlib
import math
import operator
import struct
from dataclasses import dataclass
from typing import Sequence

import torch

TIMESTEP_SCALE = 1000.0  # Wan's time embedding takes sigma in [0, 1000]
_U64 = 2**64


@dataclass(frozen=True)
class FlowMatchingSettings:
    """Mirrors ObjectiveConfig.timestep_sampling and .shift; logit_mean/std only apply to logit_normal."""

    shift: float = 5.0
    timestep_sampling: str = "uniform"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep_sampling must be 'uniform' or 'logit_normal', got {self.timestep_sampling!r}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


# ---- the schedule -------------------------------------------------------------------------------------------

def shift_sigma(t, shift: float = 5.0):
    """Wan's shift: sigma = shift*t / (1 + (shift-1)*t). Monotone, fixes 0 and 1; shift > 1 favours noisier t."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def model_timestep(sigma):
    return sigma * TIMESTEP_SCALE


def _expand_like(sigma_B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma_B.reshape(-1, *([1] * (x.ndim - 1)))


def noisy_latent(x0_BCFHW: torch.Tensor, eps_BCFHW: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
    sigma = _expand_like(sigma_B.to(x0_BCFHW.dtype), x0_BCFHW)
    return (1 - sigma) * x0_BCFHW + sigma * eps_BCFHW


def velocity_target(x0_BCFHW: torch.Tensor, eps_BCFHW: torch.Tensor) -> torch.Tensor:
    return eps_BCFHW - x0_BCFHW


# ---- keyed RNG ----------------------------------------------------------------------------------------------

def key_seed(seed: int, step: int, pair_id: int, draw: int = 0, stream: str = "noise") -> int:
    """A stable 63-bit seed for one (seed, step, pair_id, draw) in one stream ('noise' or 'timestep')."""
    if stream not in ("noise", "timestep"):
        raise ValueError(f"stream must be 'noise' or 'timestep', got {stream!r}")
    key = []
    for name, v in zip(("seed", "step", "pair_id", "draw"), (seed, step, pair_id, draw)):
        try:
            v = operator.index(v)  # ints, numpy ints, 0-d integer tensors; never a silently truncated float
        except TypeError:
            raise ValueError(f"{name} must be an integer, got {v!r}") from None
        if not 0 <= v < _U64:
            raise ValueError(f"{name} must be an integer in [0, 2**64), got {v}")
        key.append(v)
    digest = hashlib.blake2b(struct.pack("<4Q", *key), digest_size=8,
                             person=f"regdpo-{stream}".encode()).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)  # 63 bits: valid for every torch seed API


def _generator(seed, step, pair_id, draw, stream) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(key_seed(seed, step, pair_id, draw, stream))
    return g


def pair_noise(seed: int, step: int, pair_id: int, shape: Sequence[int], draw: int = 0,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise of `shape` for one pair: drawn on CPU in float32, then cast and moved."""
    eps = torch.randn(tuple(shape), generator=_generator(seed, step, pair_id, draw, "noise"),
                      dtype=torch.float32)
    return eps.to(device=device, dtype=dtype)


def pair_timestep(seed: int, step: int, pair_id: int, draw: int = 0,
                  settings: FlowMatchingSettings = FlowMatchingSettings()) -> float:
    """t in [0, 1) for one pair (before the shift): uniform, or sigmoid of N(logit_mean, logit_std)."""
    g = _generator(seed, step, pair_id, draw, "timestep")
    if settings.timestep_sampling == "uniform":
        return torch.rand((), generator=g, dtype=torch.float64).item()
    u = torch.randn((), generator=g, dtype=torch.float64).item()
    return 1.0 / (1.0 + math.exp(-(settings.logit_mean + settings.logit_std * u)))


# ---- a micro-batch of pairs ---------------------------------------------------------------------------------

@dataclass
class PairBatch:
    x_t_BCFHW: torch.Tensor     # DiT input, winners then losers, dtype of the latents
    target_BCFHW: torch.Tensor  # velocity eps - x0, same layout and dtype
    timestep_B: torch.Tensor    # 1000 * sigma, float32 (the DiT's time input)
    sigma_P: torch.Tensor       # float64 per pair, shared by winner and loser
    t_P: torch.Tensor           # float64 per pair, before the shift


def stack_pair(winner_P, loser_P) -> torch.Tensor:
    return torch.cat([winner_P, loser_P], dim=0)


def split_pair(x_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of stack_pair: (winners, losers), each [P, ...] (views, no copy)."""
    if x_B.shape[0] % 2:
        raise ValueError(f"a stacked pair batch has an even leading dim, got shape {tuple(x_B.shape)}")
    half = x_B.shape[0] // 2
    return x_B[:half], x_B[half:]


def make_pair_batch(x0_w_PCFHW: torch.Tensor, x0_l_PCFHW: torch.Tensor, pair_ids: Sequence[int], *,
                    seed: int, step: int, settings: FlowMatchingSettings = FlowMatchingSettings(),
                    draw: int = 0) -> PairBatch:
    """Noised inputs and velocity targets for winners and losers, stacked as [w_0..w_{P-1}, l_0..l_{P-1}].

    Pair i uses the key (seed, step, pair_ids[i], draw) for both its winner and loser. The arithmetic runs in
    at least float32 and the results are cast back to the latents' dtype. Under context parallelism every
    rank builds the full batch and then takes its token slice: the noise is defined per full sample.
    """
    if x0_w_PCFHW.shape != x0_l_PCFHW.shape:
        raise ValueError(f"winner and loser latents differ in shape: {tuple(x0_w_PCFHW.shape)} "
                         f"vs {tuple(x0_l_PCFHW.shape)}")
    ids = list(pair_ids.tolist() if torch.is_tensor(pair_ids) else pair_ids)  # key_seed checks each
    if len(ids) != x0_w_PCFHW.shape[0]:
        raise ValueError(f"{len(ids)} pair ids for {x0_w_PCFHW.shape[0]} pairs of latents")
    device, out_dtype = x0_w_PCFHW.device, x0_w_PCFHW.dtype
    work = torch.promote_types(out_dtype, torch.float32)
    sample_shape = x0_w_PCFHW.shape[1:]

    eps_PCFHW = torch.stack([pair_noise(seed, step, i, sample_shape, draw, work, device) for i in ids])
    t_P = torch.tensor([pair_timestep(seed, step, i, draw, settings) for i in ids], dtype=torch.float64)
    sigma_P = shift_sigma(t_P, settings.shift)

    x0_BCFHW = stack_pair(x0_w_PCFHW, x0_l_PCFHW).to(work)
    eps_BCFHW = stack_pair(eps_PCFHW, eps_PCFHW)  # shared noise
    sigma_B = stack_pair(sigma_P, sigma_P).to(device)
    return PairBatch(
        x_t_BCFHW=noisy_latent(x0_BCFHW, eps_BCFHW, sigma_B.to(work)).to(out_dtype),
        target_BCFHW=velocity_target(x0_BCFHW, eps_BCFHW).to(out_dtype),
        timestep_B=model_timestep(sigma_B).to(torch.float32),
        sigma_P=sigma_P,
        t_P=t_P,
    )

"""Conditioning of the Wan DiT: sinusoidal time embedding, text and image projections, 3D RoPE.

Legend: B batch, T text tokens, I image tokens, E input embedding width, D hidden, K head dim.
These modules are small and replicated on every tensor-parallel rank.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .arch import WanArch


def timestep_sinusoid(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] of t times geometric frequencies (diffusers' Timesteps with flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    angles = t_B.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class _TwoLayerMLP(nn.Module):
    def __init__(self, d_in: int, d_out: int, act):
        super().__init__()
        self.linear_1, self.linear_2, self.act = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out), act

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class ImageEmbedder(nn.Module):
    """CLIP image tokens -> D: LayerNorm, Linear+GELU, Linear, LayerNorm (all norms in fp32)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_in), nn.LayerNorm(d_out)
        self.fc1, self.fc2 = nn.Linear(d_in, d_in), nn.Linear(d_in, d_out)

    @staticmethod
    def _ln(norm: nn.LayerNorm, x):
        return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).to(x.dtype)

    def forward(self, x_BIE):
        return self._ln(self.norm2, self.fc2(F.gelu(self.fc1(self._ln(self.norm1, x_BIE)))))


class ConditionEmbedder(nn.Module):
    """Returns temb [B, D], the 6-way block modulation [B, 6, D], and the context [B, I+T, D]."""

    def __init__(self, arch: WanArch):
        super().__init__()
        d = arch.hidden
        self.freq_dim = arch.freq_dim
        self.time_embedder = _TwoLayerMLP(arch.freq_dim, d, nn.SiLU())
        self.time_proj = nn.Linear(d, 6 * d)
        self.text_embedder = _TwoLayerMLP(arch.text_dim, d, nn.GELU(approximate="tanh"))
        self.image_embedder = ImageEmbedder(arch.image_dim, d) if arch.image_dim is not None else None

    def forward(self, timestep_B, text_BTE, image_BIE=None):
        sinus = timestep_sinusoid(timestep_B, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        temb_BD = self.time_embedder(sinus).type_as(text_BTE)
        modulation_B6D = self.time_proj(F.silu(temb_BD)).unflatten(1, (6, -1))
        context = self.text_embedder(text_BTE)
        if self.image_embedder is not None:
            if image_BIE is None:
                raise ValueError("this is an I2V model: image embeddings (encoder_hidden_states_image) are required")
            context = torch.cat([self.image_embedder(image_BIE), context], dim=1)
        return temb_BD, modulation_B6D, context


class Rope3D(nn.Module):
    """Wan's 3D rotary table: head dim split into frame/height/width bands (K - 4(K//6), 2(K//6), 2(K//6)).

    `table(grid)` returns cos + i sin (complex64) of shape [S, 1, 1, K/2] for the flattened (f, h, w) token
    grid: the angles' cosines and sines computed in float64 like the reference, each stored in fp32 (what
    rope_norm.rotate multiplies the pairs of q and k by).
    """

    def __init__(self, arch: WanArch):
        super().__init__()
        k = arch.head_dim
        self.bands = (k - 4 * (k // 6), 2 * (k // 6), 2 * (k // 6))
        self.max_len, self.theta = arch.rope_max_seq_len, arch.rope_theta

    def _angles(self, band: int, n: int, device) -> torch.Tensor:
        inv = 1.0 / self.theta ** (torch.arange(0, band, 2, dtype=torch.float64, device=device) / band)
        return torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv[None, :]

    def table(self, grid: tuple[int, int, int], device=None) -> torch.Tensor:
        f, h, w = grid
        if max(grid) > self.max_len:
            raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={self.max_len}")
        af, ah, aw = (self._angles(b, n, device) for b, n in zip(self.bands, grid))
        ang = torch.cat([af[:, None, None].expand(f, h, w, -1), ah[None, :, None].expand(f, h, w, -1),
                         aw[None, None, :].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, 1, -1)
        return torch.complex(ang.cos().float(), ang.sin().float())

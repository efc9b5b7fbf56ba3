"""The frozen Wan VAE (diffusers `AutoencoderKLWan`): pixels <-> normalised latents, and Wan2.1's I2V condition.

Normalisation as Wan: z = (mode of the posterior - latents_mean) / latents_std per channel, with the
statistics from the VAE's own config. The I2V condition is what WanImageToVideoPipeline.prepare_latents
builds: 4 mask channels (1 on the first frame) + the latents of a video whose frames after the first are
zeros, 20 channels that the I2V DiT concatenates to the 16 noisy ones (= 36 input channels).

Legend: B batch, C channels, T pixel frames, F latent frames, H/W pixels, h/w latent height/width.
"""
from __future__ import annotations

from pathlib import Path

import torch

MASK_CHANNELS = 4  # = the VAE's temporal stride: the first frame's mask repeated 4x, then one per latent frame


class WanVAE:
    def __init__(self, vae, path: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.vae = frozen(vae, device, dtype)
        self.path, self.device, self.dtype = path, torch.device(device), dtype
        cfg = vae.config
        self.z_dim = cfg.z_dim
        self.t_stride = cfg.get("scale_factor_temporal") or 4
        self.s_stride = cfg.get("scale_factor_spatial") or 8
        self.mean_C = torch.tensor(cfg.latents_mean, dtype=torch.float32)
        self.std_C = torch.tensor(cfg.latents_std, dtype=torch.float32)
        if self.mean_C.numel() != self.z_dim or self.std_C.numel() != self.z_dim:
            raise ValueError(f"VAE {path}: latents_mean/std have {self.mean_C.numel()}/{self.std_C.numel()} "
                             f"entries, z_dim is {self.z_dim}")

    @classmethod
    def load(cls, path: str | Path, device="cpu", dtype=torch.float32) -> "WanVAE":
        from diffusers import AutoencoderKLWan

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"VAE folder {path} has no config.json (want a diffusers AutoencoderKLWan folder, "
                             f"e.g. Wan2.1-T2V-14B-Diffusers/vae)")
        return cls(AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype), str(path.resolve()), device, dtype)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.z_dim, (frames - 1) // self.t_stride + 1, height // self.s_stride, width // self.s_stride)

    def describe(self) -> dict:
        """What the store records about the VAE (and checks when a run resumes)."""
        return {"class": type(self.vae).__name__, "path": self.path, "z_dim": self.z_dim,
                "latents_mean": self.mean_C.tolist(), "latents_std": self.std_C.tolist(),
                "scale_factor_temporal": self.t_stride, "scale_factor_spatial": self.s_stride,
                "normalization": "(z - latents_mean) / latents_std per channel, z = posterior mode"}

    @torch.no_grad()
    def encode(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """float pixels in [-1, 1] -> normalised latents float32 [B, z_dim, F, h, w]."""
        x = video_BCTHW.to(device=self.device, dtype=self.dtype)
        z_BCFhw = self.vae.encode(x).latent_dist.mode().float()
        mean, std = self.mean_C.to(z_BCFhw.device), self.std_C.to(z_BCFhw.device)
        return (z_BCFhw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def decode(self, latents_BCFhw: torch.Tensor) -> torch.Tensor:
        """The inverse of `encode`: normalised latents -> float32 pixels [B, 3, T, H, W] in [-1, 1],
        T = 1 + t_stride * (F - 1)."""
        if latents_BCFhw.dim() != 5 or latents_BCFhw.shape[1] != self.z_dim:
            raise ValueError(f"VAE {self.path}: latents of shape {list(latents_BCFhw.shape)}, want "
                             f"[B, {self.z_dim}, F, h, w]")
        z = latents_BCFhw.to(device=self.device, dtype=torch.float32)
        mean, std = self.mean_C.to(z.device), self.std_C.to(z.device)
        z = z * std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)
        pixels_BCTHW = self.vae.decode(z.to(self.dtype), return_dict=False)[0].float()
        return pixels_BCTHW.clamp(-1, 1)  # diffusers clamps too; kept so the range does not depend on its version

    @torch.no_grad()
    def i2v_condition(self, first_frame_BCHW: torch.Tensor, frames: int) -> torch.Tensor:
        """[B, 4 + z_dim, F, h, w]: the first-frame mask and the latents of (first frame, zeros...)."""
        b, c, height, width = first_frame_BCHW.shape
        zeros = first_frame_BCHW.new_zeros(b, c, frames - 1, height, width)
        latent_BCFhw = self.encode(torch.cat([first_frame_BCHW[:, :, None], zeros], dim=2))
        _, _, f, h, w = latent_BCFhw.shape
        mask_B1Thw = torch.zeros(b, 1, frames, h, w, device=latent_BCFhw.device)
        mask_B1Thw[:, :, 0] = 1
        # the first pixel frame stands for a whole latent step: repeat it to the temporal stride
        mask_B1Thw = torch.cat([mask_B1Thw[:, :, :1].repeat_interleave(self.t_stride, dim=2), mask_B1Thw[:, :, 1:]], 2)
        mask_B4Fhw = mask_B1Thw.view(b, f, self.t_stride, h, w).transpose(1, 2)
        return torch.cat([mask_B4Fhw, latent_BCFhw], dim=1)


def frozen(module, device, dtype):
    """eval, no grads, on `device`; cast only when needed (diffusers warns on casting keep-in-fp32 modules)."""
    module = module.eval().requires_grad_(False).to(device)
    return module if next(module.parameters()).dtype == dtype else module.to(dtype)

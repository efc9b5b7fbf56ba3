"""Negatives from the base model: K clips per real clip, sampled from its prompt (T2V) or prompt + first
frame (I2V) with our Megatron Wan, latents only (nothing is decoded to pixels).

Noise is keyed on (seed, real id, k), so a resumed run regenerates exactly what it would have made.
Legend: B batch (K negatives, x2 with CFG), C latent channels, F/h/w latent frames/height/width,
T text tokens, E text width, I image tokens.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass

import torch

from megatron_regdpo.data.progress import progress
from megatron_regdpo.data.store import GTPairStore, safe_id

from .flow import SOLVERS, guided, sample, shifted_sigmas


@dataclass(frozen=True)
class SamplerOptions:
    steps: int = 50
    solver: str = "unipc"          # "euler" or "unipc"
    shift: float = 5.0             # Wan2.1 T2V default (3.0 is suggested for 480p)
    guidance: float = 5.0          # classifier-free guidance scale; 1.0 = no unconditional pass
    negatives_per_clip: int = 1    # K
    seed: int = 0

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver={self.solver!r} is not one of {SOLVERS}")
        if self.steps < 1 or self.negatives_per_clip < 1:
            raise ValueError(f"steps={self.steps} and negatives_per_clip={self.negatives_per_clip} must be >= 1")
        shifted_sigmas(self.steps, self.shift)  # validates shift


def negative_id(real_id: str, generator: str, k: int) -> str:
    return f"{real_id}.{safe_id(generator)}.{k}"


def keyed_noise(shape, seed: int, real_id: str, k: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}/{real_id}/{k}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randn(shape, generator=g)


def check_model_fits(arch, attrs: dict) -> None:
    """ValueError when the model cannot be run on this store's latents and conditioning."""
    z_dim, text_dim = attrs["vae"]["z_dim"], attrs["text_encoder"]["dim"]
    i2v = attrs["task"] == "i2v"
    want_in = 2 * z_dim + 4 if i2v else z_dim
    problems = []
    if arch.in_channels != want_in or arch.out_channels != z_dim:
        problems.append(f"in/out channels {arch.in_channels}/{arch.out_channels}, the store needs {want_in}/{z_dim}")
    if arch.text_dim != text_dim:
        problems.append(f"text_dim {arch.text_dim}, the store's text embeddings are {text_dim} wide")
    image = attrs.get("image_encoder") or {}
    if i2v and arch.image_dim != image.get("dim"):
        problems.append(f"image_dim {arch.image_dim}, the store's CLIP embeddings are {image.get('dim')} wide")
    if not i2v and arch.image_dim is not None:
        problems.append("an I2V model (image_dim set) for a T2V store")
    if problems:
        raise ValueError(f"model does not fit the {attrs['task']} store: " + "; ".join(problems))


@torch.no_grad()
def generate_negatives(store: GTPairStore, model, arch, opts: SamplerOptions, generator: str,
                       device="cpu", dtype=torch.float32, show_progress: bool = True) -> dict:
    """Sample the missing negatives of every committed real clip; returns counts."""
    attrs = store.attrs
    check_model_fits(arch, attrs)
    model.eval()
    neg_emb_TE, _ = store.read_text(attrs["negative_prompt_id"])
    sigmas = shifted_sigmas(opts.steps, opts.shift)
    made = already = 0
    start = time.monotonic()
    reals = sorted(store.records["real"].items())
    for real_id, rec in progress(reals, total=len(reals), desc=f"negatives ({generator})", enabled=show_progress):
        ks = [k for k in range(opts.negatives_per_clip)
              if not store.committed("generated", negative_id(real_id, generator, k))]
        already += opts.negatives_per_clip - len(ks)
        if not ks:
            continue
        text_TE, _ = store.read_text(rec["prompt_id"])
        cond = None
        if attrs["task"] == "i2v":
            image_IE, cond_CFhw = store.read_image(real_id)
            cond = (cond_CFhw.to(device, dtype), image_IE.to(device, dtype))
        velocity = _velocity_fn(model, text_TE.to(device, dtype), neg_emb_TE.to(device, dtype), cond, dtype)
        noise_BCFhw = torch.stack([keyed_noise(rec["latent_shape"], opts.seed, real_id, k) for k in ks]).to(device)
        x0_BCFhw = sample(guided(velocity, opts.guidance), noise_BCFhw, sigmas, opts.solver)
        for k, x0_CFhw in zip(ks, x0_BCFhw):
            store.write_generated(negative_id(real_id, generator, k), x0_CFhw,
                                  {"real_id": real_id, "generator": generator, "k": k, "sampler": asdict(opts)})
            made += 1
    store.finalize()
    return {"generated": made, "already": already, "seconds": round(time.monotonic() - start, 2)}


def _velocity_fn(model, text_TE, neg_TE, cond, dtype):
    """velocity(x, sigma, conditional) for a batch of K latents of one real clip."""
    def velocity(x_BCFhw, sigma: float, conditional: bool) -> torch.Tensor:
        b = x_BCFhw.shape[0]
        text_BTE = (text_TE if conditional else neg_TE).expand(b, -1, -1)
        inp, image_BIE = x_BCFhw.to(dtype), None
        if cond is not None:  # I2V: 20 condition channels after the 16 noisy ones, CLIP tokens as context
            inp = torch.cat([inp, cond[0].expand(b, -1, -1, -1, -1)], dim=1)
            image_BIE = cond[1].expand(b, -1, -1)
        timestep_B = torch.full((b,), sigma * 1000.0, device=x_BCFhw.device, dtype=dtype)
        return model(inp, timestep_B, text_BTE, image_BIE).float()
    return velocity


def debug_arch_for(attrs: dict):
    """The `debug` Wan architecture with the widths this store needs (random-init tests and demos)."""
    import dataclasses

    from megatron_regdpo.models.wan.arch import SIZES

    z_dim, i2v = attrs["vae"]["z_dim"], attrs["task"] == "i2v"
    image_dim = (attrs.get("image_encoder") or {}).get("dim") if i2v else None
    return dataclasses.replace(SIZES["debug"], in_channels=2 * z_dim + 4 if i2v else z_dim, out_channels=z_dim,
                               text_dim=attrs["text_encoder"]["dim"], image_dim=image_dim)

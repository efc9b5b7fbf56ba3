"""Negatives from the base model: K clips per real clip, sampled from its prompt (T2V) or prompt + first
frame (I2V) with our Megatron Wan, latents only (nothing is decoded to pixels).

They are what diffusers' WanPipeline / WanImageToVideoPipeline (output_type="latent") samples for the same
checkpoint, noise and embeddings: the scheduler's grid and timesteps (schedules.py, from the checkpoint's
scheduler_config.json when given), its solver step (flow.py), CFG as the pipeline combines it
(v_u + g (v_c - v_u) in the model's dtype), the transformer fed x in its dtype with the timestep the
scheduler holds (int64 for UniPC, float32 for Euler), and for I2V the 20 condition channels (4 first-frame
mask channels, then the VAE latents of the first frame followed by zeros: data/encode/vae.py, as the
pipeline's prepare_latents) concatenated after the 16 noisy ones, with the CLIP tokens as image context for
both the conditional and the unconditional pass. With cfg_batch (default) the two passes are one forward of
a doubled batch (same numbers, fewer launches; 2x the activation memory of one pass).

Noise is keyed on (seed, real id, k), so a resumed run regenerates exactly what it would have made, on any
number of ranks: under torchrun the real clips are split over the data-parallel groups (data/ranks.py), each
group's TP/CP ranks sample together (the model gathers its output) and the group's first rank writes.
Legend: B batch (K negatives, x2 with batched CFG), C latent channels, F/h/w latent frames/height/width,
T text tokens, E text width, I image tokens.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass

import torch

from megatron_regdpo.data.progress import Bar
from megatron_regdpo.data.ranks import Job, rounds, shard
from megatron_regdpo.data.store import GTPairStore, safe_id

from .flow import guided, sample
from .schedules import FlowScheduler, Schedule


@dataclass(frozen=True)
class SamplerOptions:
    steps: int = 50
    solver: str = "unipc"          # "euler" or "unipc" (ignored when `scheduler` is given)
    shift: float = 5.0             # Wan2.1 T2V default (3.0 is suggested for 480p; ignored with `scheduler`)
    guidance: float = 5.0          # classifier-free guidance scale; <= 1 = no unconditional pass
    negatives_per_clip: int = 1    # K
    seed: int = 0
    cfg_batch: bool = True         # conditional and unconditional passes as one forward of a doubled batch
    scheduler: FlowScheduler | None = None  # the checkpoint's scheduler (FlowScheduler.read); decides solver/shift

    def __post_init__(self):
        if self.steps < 1 or self.negatives_per_clip < 1:
            raise ValueError(f"steps={self.steps} and negatives_per_clip={self.negatives_per_clip} must be >= 1")
        sched = self.scheduler or FlowScheduler(kind=self.solver, shift=self.shift)  # validates both
        for name, value in (("scheduler", sched), ("solver", sched.kind), ("shift", sched.shift)):
            object.__setattr__(self, name, value)

    def schedule(self) -> Schedule:
        return self.scheduler.schedule(self.steps)


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
                       device="cpu", dtype=torch.float32, show_progress: bool = True, job: Job | None = None) -> dict:
    """Sample the missing negatives of every committed real clip; returns counts (all ranks' on each rank)."""
    job, attrs, start = job or Job(), store.attrs, time.monotonic()
    check_model_fits(arch, attrs)
    model.eval()
    neg_emb_TE, _ = store.read_text(attrs["negative_prompt_id"])
    schedule = opts.schedule()
    todo, already = [], 0
    for real_id, rec in sorted(store.records["real"].items()):
        ks = [k for k in range(opts.negatives_per_clip)
              if not store.committed("generated", negative_id(real_id, generator, k))]
        already += opts.negatives_per_clip - len(ks)
        if ks:
            todo.append((real_id, rec, ks))
    bar = Bar(len(todo), f"negatives ({generator})", enabled=show_progress and job.lead)
    made, mine = 0, shard(todo, job)
    for i in range(rounds(len(todo), job)):
        wrote = None
        if i < len(mine):
            real_id, rec, ks = mine[i]
            x0_BCFhw = _sample_clip(store, model, opts, schedule, neg_emb_TE, real_id, rec, ks, device, dtype)
            if job.writer:
                for k, x0_CFhw in zip(ks, x0_BCFhw):
                    store.write_generated(negative_id(real_id, generator, k), x0_CFhw,
                                          {"real_id": real_id, "generator": generator, "k": k, "sampler": asdict(opts)})
                wrote = len(ks)
        parts = [n for n in job.sync(store, wrote) if n is not None]
        made += sum(parts)
        bar.update(len(parts))
    job.finish(store, bar)
    return {"generated": made, "already": already, "seconds": round(time.monotonic() - start, 2)}


def _sample_clip(store, model, opts, schedule, neg_emb_TE, real_id, rec, ks, device, dtype) -> torch.Tensor:
    """The K negatives of one real clip, [K, C, F, h, w] float32 (every rank of a TP/CP group gets them)."""
    text_TE, _ = store.read_text(rec["prompt_id"])
    cond = None
    if store.attrs["task"] == "i2v":
        image_IE, cond_CFhw = store.read_image(real_id)
        cond = (cond_CFhw.to(device, dtype), image_IE.to(device, dtype))
    velocity = guided_velocity(model, text_TE.to(device, dtype), neg_emb_TE.to(device, dtype), cond, dtype,
                               opts.guidance, opts.cfg_batch)
    noise_BCFhw = torch.stack([keyed_noise(rec["latent_shape"], opts.seed, real_id, k) for k in ks]).to(device)
    return sample(velocity, noise_BCFhw, schedule)


def guided_velocity(model, text_TE, neg_TE, cond, dtype, guidance: float, cfg_batch: bool = True):
    """velocity(x, t) with classifier-free guidance: one forward of [x; x] with [text; negative] (cfg_batch)
    or two forwards (flow.guided); guidance <= 1 runs the conditional pass only (the pipeline's rule)."""
    if guidance <= 1.0 or not cfg_batch:
        return guided(_velocity_fn(model, text_TE, neg_TE, cond, dtype), guidance)
    both = _velocity_fn(model, torch.stack([text_TE, neg_TE]), None, cond, dtype)

    def velocity(x_BCFhw, t):
        v_c, v_u = both(torch.cat([x_BCFhw, x_BCFhw]), t, True).chunk(2)
        return v_u + guidance * (v_c - v_u)
    return velocity


def _velocity_fn(model, text_TE, neg_TE, cond, dtype):
    """velocity(x, t, conditional) for a batch of latents of one real clip; `t` is the scheduler's timestep
    (0-dim, its dtype kept: the pipeline gives the transformer t.expand(B)). A [2, T, E] `text_TE` holds
    the conditional and the unconditional text for a batch [x; x] (neg_TE is then None)."""
    def velocity(x_BCFhw, t: torch.Tensor, conditional: bool) -> torch.Tensor:
        b = x_BCFhw.shape[0]
        if text_TE.dim() == 3:  # [x; x]: the first half conditional
            text_BTE = text_TE.repeat_interleave(b // 2, dim=0)
        else:
            text_BTE = (text_TE if conditional else neg_TE).expand(b, -1, -1)
        inp, image_BIE = x_BCFhw.to(dtype), None
        if cond is not None:  # I2V: 20 condition channels after the 16 noisy ones, CLIP tokens as context
            inp = torch.cat([inp, cond[0].expand(b, -1, -1, -1, -1)], dim=1)
            image_BIE = cond[1].expand(b, -1, -1)
        timestep_B = torch.as_tensor(t, device=x_BCFhw.device).expand(b)
        return model(inp, timestep_B, text_BTE, image_BIE)
    return velocity


def debug_arch_for(attrs: dict):
    """The `debug` Wan architecture with the widths this store needs (random-init tests and demos)."""
    import dataclasses

    from megatron_regdpo.models.wan.arch import SIZES

    z_dim, i2v = attrs["vae"]["z_dim"], attrs["task"] == "i2v"
    image_dim = (attrs.get("image_encoder") or {}).get("dim") if i2v else None
    return dataclasses.replace(SIZES["debug"], in_channels=2 * z_dim + 4 if i2v else z_dim, out_channels=z_dim,
                               text_dim=attrs["text_encoder"]["dim"], image_dim=image_dim)

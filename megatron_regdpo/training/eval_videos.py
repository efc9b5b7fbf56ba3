"""Validation videos: policy and reference sampled from the same noise, decoded, written side by side.

Each video is one prompt (T2V) or prompt + first frame (I2V): by default the first `eval.videos.count` real
clips of the held-out pairs (their caption, their first frame, and the real clip as the first panel), or the
lines of `eval.videos.prompts_file` (T2V). The noise is keyed on (seed, prompt) with the negatives' keyed_noise,
so every evaluation, every layout and tools/sample_videos.py start each video from the same latent. The sampler
is the negatives' one (diffusers' Wan pipelines step for step, CFG with the store's negative prompt).

    <out>/step_0000100/00_<real id>.mp4   real | reference | policy (4 px white columns), H.264 at the store's fps
    <out>/step_0000100/index.json         each file's caption, panels and CLIP scores

Ranks: the videos (and the held-out clips of the flow-matching error, eval_quality.py) are split over the
data-parallel replicas, item i to replica i % dp. The TP/CP ranks of a replica sample together (the model
gathers its output over CP; TP output is replicated) and the replica's first rank decodes with the store's VAE
and writes. With FSDP every forward gathers weights over the replicas, so all replicas run the same number of
rounds (a replica short of work samples its first item again and drops it). One all_gather_object over the
world brings every replica's records to every rank. Pipeline parallelism is refused in config validation.

Legend: C latent channels, F/h/w latent frames/height/width, T text tokens (or pixel frames), E text width,
I image tokens, H/W pixels.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_regdpo.data.negatives import SamplerOptions, guided_velocity, keyed_noise, sample
from megatron_regdpo.data.preview import (check_vae_fits, load_store_vae, panels, preview_encoder, to_uint8,
                                          write_json, write_video)
from megatron_regdpo.data.store import safe_id

from .eval_quality import ClipScorer, ModelContext, RealClip, fm_errors

INDEX = "index.json"
PANELS = ("real", "reference", "policy")  # left to right; those a video has


@dataclass
class VideoPrompt:
    name: str                          # the file's stem
    caption: str
    key: str                           # the noise key
    text_TE: torch.Tensor
    latent_shape: tuple[int, ...]      # (C, F, h, w)
    real_CFhw: torch.Tensor | None = None
    cond: tuple[torch.Tensor, torch.Tensor] | None = None  # I2V: (cond_CFhw, image_IE)


def held_out(store, pairs, pair_ids: list[int], count: int | None) -> tuple[list[VideoPrompt], list[RealClip]]:
    """The distinct real clips of the held-out pairs, in pair order: the first `count` as prompts (None: all),
    all of them as RealClips (keyed by their first pair id) for the flow-matching error."""
    prompts, clips, seen = [], [], set()
    i2v = store.attrs["task"] == "i2v"
    for pid in pair_ids:
        e = pairs[pid]
        if e.real_id in seen:
            continue
        seen.add(e.real_id)
        x0_CFhw, (text_TE, _) = store.read_latents("real", e.real_id), store.read_text(e.prompt_id)
        cond = None
        if i2v:
            image_IE, cond_CFhw = store.read_image(e.real_id)
            cond = (cond_CFhw, image_IE)
        clips.append(RealClip(pid, x0_CFhw, text_TE, cond))
        if count is None or len(prompts) < count:
            caption = store.records["text"].get(e.prompt_id, {}).get("caption") or e.prompt_id
            prompts.append(VideoPrompt(f"{len(prompts):02d}_{safe_id(e.real_id)}", caption, e.real_id, text_TE,
                                       tuple(x0_CFhw.shape), x0_CFhw, cond))
    return prompts, clips


def read_prompts_file(path) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts (one per line; '#' starts a comment)")
    return prompts


def file_prompts(store, path, latent_shape: tuple[int, ...], count: int | None = None) -> list[VideoPrompt]:
    """The prompts of a file (T2V), encoded with the store's text encoder on rank 0 and broadcast."""
    if store.attrs["task"] == "i2v":
        raise ValueError(f"prompts file {path}: an I2V store's videos need first frames; leave the prompts file "
                         f"out to sample the held-out clips (their first frames)")
    captions = read_prompts_file(path)[:count]
    payload = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        from megatron_regdpo.data.encode.text import TextEncoder

        te = store.attrs["text_encoder"]
        encoder = TextEncoder.load(te["path"], te.get("tokenizer"), store.attrs["text_len"])
        payload = [encoder.encode(captions)[0]]
        del encoder
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    return [VideoPrompt(f"{i:02d}_prompt", c, f"prompt/{i}/{c}", emb_TE, tuple(latent_shape))
            for i, (c, emb_TE) in enumerate(zip(captions, payload[0]))]


def sample_models(models: dict[str, ModelContext], prompt: VideoPrompt, opts: SamplerOptions, neg_TE, device,
                  dtype) -> dict[str, torch.Tensor]:
    """{model name: latents [C, F, h, w] float32}, every model from the same keyed noise."""
    noise_1CFhw = keyed_noise(prompt.latent_shape, opts.seed, prompt.key, 0)[None].to(device)
    cond = None if prompt.cond is None else (prompt.cond[0].to(device, dtype), prompt.cond[1].to(device, dtype))
    out = {}
    for name, ctx in models.items():
        with ctx() as model, torch.no_grad():
            velocity = guided_velocity(model, prompt.text_TE.to(device, dtype), neg_TE.to(device, dtype), cond,
                                       dtype, opts.guidance, opts.cfg_batch)
            out[name] = sample(velocity, noise_1CFhw, opts.schedule())[0].float()
    return out


class VideoWriter:
    """A replica's first rank: decodes with the store's VAE, writes the mp4, scores with CLIP (when given)."""

    def __init__(self, store, device, clip: str | None = None):
        self.vae = load_store_vae(store, device)
        check_vae_fits(self.vae, store)
        self.encoder, self.fps = preview_encoder(), float(store.attrs["fps"])
        self.clip = ClipScorer(clip, device) if clip else None

    def write(self, folder: Path, prompt: VideoPrompt, latents: dict[str, torch.Tensor]) -> dict:
        videos = dict(latents, **({"real": prompt.real_CFhw} if prompt.real_CFhw is not None else {}))
        names = [p for p in PANELS if p in videos]
        frames = {n: to_uint8(self.vae.decode(videos[n][None])[0]) for n in names}
        path = folder / f"{prompt.name}.mp4"
        write_video(path, panels([frames[n] for n in names]), self.fps, self.encoder)
        record = {"file": path.name, "caption": prompt.caption, "panels": " | ".join(names)}
        if self.clip is not None:
            record.update({f"clip_{n}": self.clip.score(frames[n], prompt.caption) for n in names})
        return record


def run_videos(prompts: list[VideoPrompt], clips: list[RealClip], models: dict[str, ModelContext],
               opts: SamplerOptions, neg_TE, folder: Path, *, writer: VideoWriter | None, dp_rank: int, dp_size: int,
               equal_rounds: bool, fm_sigmas=(), seed: int = 0, device="cpu", dtype=torch.float32,
               cp_group=None) -> tuple[list[dict], list[dict]]:
    """Sample, write and score this replica's share; returns every replica's (video records, per-clip errors),
    on every rank. `writer`: this rank's VideoWriter (a replica's first rank), else None."""
    videos, errors = [], []
    if writer is not None:
        folder.mkdir(parents=True, exist_ok=True)
    for prompt, keep in _share(prompts, dp_rank, dp_size, equal_rounds):
        latents = sample_models(models, prompt, opts, neg_TE, device, dtype)
        if keep and writer is not None:
            videos.append(writer.write(folder, prompt, latents))
    if fm_sigmas:
        for clip, keep in _share(clips, dp_rank, dp_size, equal_rounds):
            err = fm_errors(models, clip, fm_sigmas, seed, device, dtype, cp_group)
            if keep and writer is not None:
                errors.append(err)
    parts = [(videos, errors)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (videos, errors))
    records = sorted((r for v, _ in parts for r in v), key=lambda r: r["file"])
    return records, [e for _, es in parts for e in es]


def _share(items: list, dp_rank: int, dp_size: int, equal_rounds: bool) -> list[tuple[object, bool]]:
    """This replica's items (i % dp_size == dp_rank) as (item, keep); with equal_rounds, padded to as many
    rounds as the busiest replica with repeats of its first item (keep False)."""
    mine = [(x, True) for x in items[dp_rank::dp_size]]
    if equal_rounds and items:
        rounds = -(-len(items) // dp_size)
        mine += [(items[0], False)] * (rounds - len(mine))
    return mine


def summarize(records: list[dict], errors: list[dict], sigmas) -> dict[str, float]:
    """The metrics of one evaluation: mean CLIP scores per panel and the flow-matching errors."""
    from .eval_quality import fm_metrics

    out = fm_metrics(errors, sigmas)
    for name in PANELS:
        scores = [r[f"clip_{name}"] for r in records if f"clip_{name}" in r]
        if scores:
            out[f"eval/clip_{name}"] = sum(scores) / len(scores)
    return out


def write_index(folder: Path, records: list[dict], metrics: dict, sampler: SamplerOptions) -> None:
    write_json(folder / INDEX, {"videos": records, "metrics": metrics,
                                "sampler": {"steps": sampler.steps, "solver": sampler.solver, "shift": sampler.shift,
                                            "guidance": sampler.guidance, "seed": sampler.seed}})


@contextlib.contextmanager
def swapped_in(reference):
    """The cpu_swap reference's weights on the device while the context lasts."""
    reference.begin_step()
    try:
        yield reference.model
    finally:
        reference.end_step()

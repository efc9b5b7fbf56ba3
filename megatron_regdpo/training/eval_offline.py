"""Validation videos of any checkpoint, offline (tools/sample_videos.py): the trainer's eval.videos, step for step.

The policy is the checkpoint (LoRA adapters included, as model.json records them). The reference is, in this
order: `reference_ckpt` (a base checkpoint) when given; else the checkpoint's own base with the adapters off
(LoRA); else none (a full fine-tune without a base: the videos show real | policy or the policy alone).
Prompts: a prompts file (T2V, one per line) or the held-out clips (the last `holdout_pairs` pairs of the store's
pair index, as eval.holdout_pairs). Under torchrun the videos split over the data-parallel replicas of a
TP x CP layout, as in training; one process needs no launcher.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_regdpo.data.negatives import SamplerOptions
from megatron_regdpo.data.store import GTPairStore

from .eval_quality import plain
from .eval_videos import INDEX, VideoWriter, file_prompts, held_out, run_videos, summarize, write_index


@dataclass(frozen=True)
class OfflineOptions:
    prompts_file: str | None = None
    holdout_pairs: int = 0
    count: int = 4
    reference_ckpt: str | None = None
    reference: bool = True
    clip: str | None = None
    fm_sigmas: tuple[float, ...] = (0.25, 0.5, 0.75)
    latent_size: tuple[int, int, int] | None = None  # (F, h, w) for a prompts file; None = the store's first clip


def sample_checkpoint(ckpt: str | Path, store_path: str | Path, out: str | Path, sampler: SamplerOptions,
                      opts: OfflineOptions, pg, device=None) -> dict:
    """Write the videos (and index.json) into `out`; returns the metrics (every rank)."""
    from megatron_regdpo.data.negatives import check_model_fits
    from megatron_regdpo.models.lora import has_lora, lora_disabled
    from megatron_regdpo.models.wan.convert import load_checkpoint

    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
    store, out = GTPairStore(store_path, "r"), Path(out)
    if opts.prompts_file is None and opts.holdout_pairs < 1:
        raise ValueError("give --prompts FILE, or --holdout-pairs N to sample the store's last N pairs' real clips")
    pairs = store.pair_index()
    if opts.holdout_pairs > len(pairs):
        raise ValueError(f"--holdout-pairs {opts.holdout_pairs}: {store_path} has {len(pairs)} pairs")
    if out.is_dir() and any(out.iterdir()) and not (out / INDEX).is_file():
        raise ValueError(f"--out {out} holds files this tool did not write: name a new or empty folder (one it "
                         f"wrote before is reused, its videos replaced)")
    if dist.is_initialized():
        dist.barrier()  # every rank has looked before any writes
    ids = list(range(len(pairs) - opts.holdout_pairs, len(pairs)))
    prompts, clips = held_out(store, pairs, ids, opts.count if opts.prompts_file is None else 0)
    if opts.prompts_file is not None:
        size = opts.latent_size or tuple(next(iter(store.records["real"].values()))["latent_shape"][1:])
        prompts = file_prompts(store, opts.prompts_file, (store.attrs["vae"]["z_dim"], *size), opts.count)

    policy, arch = load_checkpoint(ckpt, pg)
    check_model_fits(arch, store.attrs)
    policy = policy.to(device).eval()
    dtype = next(policy.parameters()).dtype
    models = {"policy": plain(policy)}
    if opts.reference and opts.reference_ckpt is not None:
        models["reference"] = plain(load_checkpoint(opts.reference_ckpt, pg)[0].to(device).eval())
    elif opts.reference and has_lora(policy):
        models["reference"] = lambda: lora_disabled(policy)
    lead = dist.get_rank(pg.tp) == 0 and dist.get_rank(pg.cp) == 0
    writer = VideoWriter(store, device, opts.clip) if lead else None
    neg_TE = store.read_text(store.attrs["negative_prompt_id"])[0]
    records, errors = run_videos(prompts, clips, models, sampler, neg_TE, out, writer=writer,
                                 dp_rank=dist.get_rank(pg.dp), dp_size=dist.get_world_size(pg.dp),
                                 equal_rounds=False, fm_sigmas=opts.fm_sigmas, seed=sampler.seed, device=device,
                                 dtype=dtype, cp_group=pg.cp)
    metrics = summarize(records, errors, opts.fm_sigmas)
    if dist.get_rank() == 0:
        write_index(out, records, metrics, sampler)
    return {"videos": [str(out / r["file"]) for r in records], **metrics}

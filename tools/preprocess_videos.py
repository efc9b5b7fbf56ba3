#!/usr/bin/env python
"""Preprocess a folder of captioned videos into a GT-Pair store (real-clip latents, text embeddings,
I2V image conditioning). Resumable: rerun the same command after an interruption.

  python tools/preprocess_videos.py --input DIR --store STORE [--task t2v|i2v] [--frames 81 --fps 16]
      [--short-side 480 --bucket 16:9|9:16|3:4|1:1|auto] (--wan-dir DIR | --vae PATH --text-encoder PATH
      [--image-encoder PATH] | --tiny-random-models) [--prefer CODEC=BACKEND[,BACKEND]] [--device cpu|cuda]
      [--min-short-side 0 --max-upscale 2 --static-threshold 0.003 --scene-cut-threshold 0.4]

  # on every GPU of a node (or N CPU processes): the clips are split over the ranks, each done once
  torchrun --nproc-per-node N tools/preprocess_videos.py ... (same flags)

Captions: <name>.txt next to <name>.<ext>, or captions.jsonl lines {"file", "caption"} in DIR.
Skipped inputs go to STORE/skipped.jsonl (or --report). Exit 0 when the run finished (skips included),
2 on a usage error (one `error:` line from rank 0).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megatron_regdpo.training.startup import hide_known_warnings  # imports no torch


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="folder of videos with captions")
    ap.add_argument("--store", required=True, help="zarr store to create or resume")
    ap.add_argument("--task", choices=("t2v", "i2v"), default="t2v")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--fps", type=float, default=16)
    ap.add_argument("--short-side", type=int, default=480)
    ap.add_argument("--bucket", default="16:9", help="16:9, 9:16, 3:4, 1:1 or auto (nearest aspect per clip)")
    ap.add_argument("--min-short-side", type=int, default=0, help="skip clips smaller than this (paper: 720)")
    filters = ap.add_argument_group("clip filters (skipped clips go to skipped.jsonl with the measured value; 0 = off)")
    filters.add_argument("--max-upscale", type=float, default=2.0,
                         help="skip clips the bucket enlarges by more than this factor (cover-resize)")
    filters.add_argument("--static-threshold", type=float, default=0.003,
                         help="skip near-static clips: mean |frame difference| below this ([-1, 1] pixel units)")
    filters.add_argument("--scene-cut-threshold", type=float, default=0.4,
                         help="skip clips with a hard cut: a luma-histogram jump above this (0..1)")
    models = ap.add_argument_group("encoders (local folders; nothing is downloaded)")
    models.add_argument("--wan-dir", help="a Wan2.1 diffusers folder with vae/ text_encoder/ tokenizer/ "
                                          "[image_encoder/ image_processor/]")
    for name in ("vae", "text-encoder", "tokenizer", "image-encoder", "image-processor"):
        models.add_argument(f"--{name}")
    models.add_argument("--tiny-random-models", action="store_true",
                        help="seeded small random encoders, saved to --models-dir (default STORE.tiny_models)")
    models.add_argument("--models-dir")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--latent-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--prefer", action="append", default=[], metavar="CODEC=BACKEND[,BACKEND]",
                    help="decoder preference per codec (backends: pyav, dali-cpu, dali-nvdec; codec * = any)")
    ap.add_argument("--report", help="JSONL of skipped inputs (default STORE/skipped.jsonl)")
    ap.add_argument("--limit", type=int, help="process at most N new clips")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="log each file's decoder choice")
    return ap.parse_args(argv)


def model_paths(args):
    from megatron_regdpo.data.encode import ModelPaths, tiny_models

    if args.tiny_random_models:
        return tiny_models(args.models_dir or f"{args.store.rstrip('/')}.tiny_models")
    root = Path(args.wan_dir) if args.wan_dir else None

    def pick(flag: str, sub: str) -> str | None:  # an explicit flag wins over the --wan-dir subfolder
        return getattr(args, flag) or (str(root / sub) if root and (root / sub).is_dir() else None)

    vae, text = pick("vae", "vae"), pick("text_encoder", "text_encoder")
    if not vae or not text:
        raise ValueError("name the encoders: --wan-dir DIR, or --vae PATH and --text-encoder PATH "
                         "(or --tiny-random-models for tests)")
    return ModelPaths(vae, text, pick("tokenizer", "tokenizer"), pick("image_encoder", "image_encoder"),
                      pick("image_processor", "image_processor"))


def main(argv=None) -> int:
    from megatron_regdpo.training.lifecycle import exit_with_launcher, parse_on_every_rank

    exit_with_launcher()  # under torchrun: a worker does not outlive its launcher
    args = parse_on_every_rank(parse_args, argv)
    hide_known_warnings()  # before megatron-core is imported: it warns on import
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from megatron_regdpo.data.decode import DecodeOptions, parse_preference
    from megatron_regdpo.data.preprocess import PreprocessOptions, preprocess
    from megatron_regdpo.data.progress import quiet_library_logs
    from megatron_regdpo.data.ranks import says_errors, start_job

    quiet_library_logs()
    job = start_job(args.device)
    try:
        prefer = None
        if args.prefer:
            from megatron_regdpo.data.decode import CPU_PREFERENCE, GPU_PREFERENCE

            prefer = {**(GPU_PREFERENCE if args.device == "cuda" else CPU_PREFERENCE), **parse_preference(args.prefer)}
        if args.tiny_random_models and not job.lead:
            job.barrier()  # rank 0 builds the tiny models first, the others then read them
        paths = model_paths(args)
        if args.tiny_random_models and job.lead:
            job.barrier()
        decode = DecodeOptions(fps=args.fps, frames=args.frames, short_side=args.short_side, bucket=args.bucket,
                               min_short_side=args.min_short_side, device=args.device, prefer=prefer,
                               max_upscale=args.max_upscale, static_threshold=args.static_threshold,
                               scene_cut_threshold=args.scene_cut_threshold)
        opts = PreprocessOptions(input_dir=args.input, store=args.store, models=paths, decode=decode,
                                 task=args.task, text_len=args.text_len, latent_dtype=args.latent_dtype,
                                 report=args.report, device=args.device, limit=args.limit,
                                 show_progress=not args.no_progress)
        summary = preprocess(opts, job)
    except ValueError as e:
        if says_errors():
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        job.close()
    if job.lead:
        print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())

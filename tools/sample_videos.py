#!/usr/bin/env python
"""Validation videos of any checkpoint, offline: what the trainer's eval.videos writes, for one checkpoint.

  # prompts from a file (T2V; one per line, '#' comments), the store giving the VAE, text encoder, negative prompt
  python tools/sample_videos.py --ckpt RUN/checkpoints/iter_0001000 --store STORE --prompts FILE --out DIR
  # the store's held-out clips (the last N pairs of its pair index, as eval.holdout_pairs): real | reference | policy
  python tools/sample_videos.py --ckpt CKPT --store STORE --holdout-pairs 8 --out DIR [--count 4]
      [--reference BASE_CKPT | --no-reference] [--steps 20] [--guidance 5] [--solver unipc|euler] [--shift 5]
      [--seed 1234] [--clip CLIP_DIR] [--fm-sigmas 0.25 0.5 0.75] [--size F h w] [--tp 1] [--cp 1]
  torchrun --nproc-per-node N tools/sample_videos.py ...   (videos split over N / (tp * cp) replicas)

The reference panel: --reference BASE_CKPT, else the checkpoint's base with its LoRA adapters off, else none.
Use the run's seed (run.seed) to get the trainer's noise. Writes DIR/<nn>_<id>.mp4 and DIR/index.json (captions,
CLIP scores with --clip, the flow-matching errors of policy and reference on the held-out clips). Exit 0 on
success, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_regdpo.training.startup import hide_known_warnings  # imports no torch


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a training or model checkpoint (its model.json names the model)")
    ap.add_argument("--store", required=True, help="the GT-Pair store: VAE, text encoder, negative prompt, clips")
    ap.add_argument("--out", required=True, help="folder for the mp4 files and index.json")
    ap.add_argument("--prompts", help="T2V prompts, one per line")
    ap.add_argument("--holdout-pairs", type=int, default=0, help="the store's last N pairs are held out")
    ap.add_argument("--count", type=int, default=4, help="videos at most")
    ref = ap.add_mutually_exclusive_group()
    ref.add_argument("--reference", help="base checkpoint for the reference panel")
    ref.add_argument("--no-reference", action="store_true", help="the policy alone")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--solver", choices=("unipc", "euler"), default="unipc")
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1234, help="noise seed (the trainer uses run.seed, default 1234)")
    ap.add_argument("--clip", help="local CLIPModel folder (with its tokenizer and image processor)")
    ap.add_argument("--fm-sigmas", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                    help="noise levels of the flow-matching error on the held-out clips (none: skip it)")
    ap.add_argument("--size", type=int, nargs=3, metavar=("F", "H", "W"),
                    help="latent frames, height, width for --prompts (default: the store's first clip)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    hide_known_warnings()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from megatron_regdpo.data.negatives import SamplerOptions
    from megatron_regdpo.parallel.groups import distributed_session
    from megatron_regdpo.training.eval_offline import OfflineOptions, sample_checkpoint

    try:
        sampler = SamplerOptions(steps=args.steps, solver=args.solver, shift=args.shift, guidance=args.guidance,
                                 seed=args.seed)
        opts = OfflineOptions(prompts_file=args.prompts, holdout_pairs=args.holdout_pairs, count=args.count,
                              reference_ckpt=args.reference, reference=not args.no_reference, clip=args.clip,
                              fm_sigmas=tuple(args.fm_sigmas), latent_size=tuple(args.size) if args.size else None)
        if any(not 0 < s < 1 for s in opts.fm_sigmas):
            raise ValueError(f"--fm-sigmas {list(opts.fm_sigmas)}: every noise level must be in (0, 1)")
        with distributed_session(args.tp, 1, args.cp, seed=args.seed) as pg:
            result = sample_checkpoint(args.ckpt, args.store, args.out, sampler, opts, pg)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        for path in result["videos"]:
            print(f"wrote {path}")
        print(json.dumps({k: round(v, 6) for k, v in result.items() if k != "videos"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Precompute the reference errors of every GT pair for objective.reference.mode=cached.

  python tools/precompute_reference.py --checkpoint BASE_CKPT --pairs BUNDLE.pt --out STORE/reference_cache \\
      --seed 1234 [--step 0] [--draws 2] [--shift 5.0] [--timestep-sampling uniform] [--pairs-per-batch 1]

BASE_CKPT is the base model's distributed checkpoint (tools/convert_checkpoint.py import). Pairs come from a
bundle file (reference/precompute.read_pair_bundle) or from `--pair-reader module:function`, a callable taking
the --pairs argument and returning PairLatents. Draws 0..N-1 are computed for every pair with the keyed noise
of (seed, step, pair_id, draw); training reads them back with the same seed and step. Under torchrun the
ranks split the pairs over data parallelism (and use --tp/--cp inside the model).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from megatron_regdpo.training.startup import hide_known_warnings  # imports no torch


def main(argv=None) -> int:
    hide_known_warnings()  # before megatron-core is imported: it warns on import
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="base model distributed checkpoint")
    ap.add_argument("--pairs", required=True, help="pair bundle file (or the --pair-reader's argument)")
    ap.add_argument("--pair-reader", default=None, help="module:function returning PairLatents for --pairs")
    ap.add_argument("--out", required=True, help="the cache group to write, e.g. STORE/reference_cache")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--step", type=int, default=0)
    ap.add_argument("--draws", type=int, default=1)
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--timestep-sampling", default="uniform", choices=("uniform", "logit_normal"))
    ap.add_argument("--logit-mean", type=float, default=0.0)
    ap.add_argument("--logit-std", type=float, default=1.0)
    ap.add_argument("--pairs-per-batch", type=int, default=1)
    ap.add_argument("--dtype", default=None, help="the model's dtype, as training's precision.params_dtype "
                                                  "(default: the checkpoint's)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch
    import torch.distributed as dist

    from megatron_regdpo.checkpoint_io.megatron_ckpt import read_meta
    from megatron_regdpo.models.wan.convert import load_checkpoint
    from megatron_regdpo.objectives.flow_matching import FlowMatchingSettings
    from megatron_regdpo.parallel.groups import distributed_session
    from megatron_regdpo.reference import (ResidentReference, checkpoint_fingerprint, precompute_reference_errors,
                                           read_pair_bundle, write_reference_cache)

    settings = FlowMatchingSettings(shift=args.shift, timestep_sampling=args.timestep_sampling,
                                    logit_mean=args.logit_mean, logit_std=args.logit_std)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.pair_reader:
        module, _, fn = args.pair_reader.partition(":")
        pairs = list(getattr(importlib.import_module(module), fn)(args.pairs))
    else:
        pairs = read_pair_bundle(args.pairs)
    with distributed_session(tp=args.tp, cp=args.cp) as pg:
        model, arch = load_checkpoint(args.checkpoint, pg, params_dtype=dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        device, model_dtype = next(model.parameters()).device, next(model.parameters()).dtype
        out = precompute_reference_errors(
            ResidentReference(model.eval(), pg.cp), pairs, seed=args.seed, step=args.step,
            draws=range(args.draws), settings=settings, pairs_per_batch=args.pairs_per_batch, device=device,
            dtype=model_dtype, dp_group=pg.dp)
        if dist.get_rank() == 0:
            meta = read_meta(args.checkpoint)
            write_reference_cache(
                args.out, out["pair_id"], out["draw"], out["err_w"], out["err_l"], seed=args.seed, step=args.step,
                flow_matching=settings, err_dtype=out["err_dtype"], overwrite=args.overwrite,
                model={"checkpoint": str(Path(args.checkpoint).resolve()), "arch": meta.get("arch"),
                       "checkpoint_id": checkpoint_fingerprint(args.checkpoint),
                       "dtype": str(model_dtype)})
            print(f"wrote {len(out['pair_id'])} reference errors ({len(pairs)} pairs x {args.draws} draw(s)) "
                  f"to {args.out}")
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())

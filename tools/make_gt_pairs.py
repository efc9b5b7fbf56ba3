#!/usr/bin/env python
"""Make the losers of the GT-Pairs in a store written by tools/preprocess_videos.py.

  # K negatives per real clip from the base model (a Megatron checkpoint, or a random debug model for tests)
  python tools/make_gt_pairs.py generate --store STORE (--ckpt DIR | --random-debug) [-k 1] [--steps 50]
      [--scheduler WAN_DIFFUSERS_DIR | scheduler_config.json] [--solver unipc|euler] [--shift 5] [--guidance 5]
      [--no-cfg-batch] [--seed 0] [--generator NAME] [--device cpu|cuda] [--tp 1] [--cp 1]
  # on N GPUs (or CPU processes): the clips split over N / (tp * cp) model replicas, each negative made once
  torchrun --nproc-per-node N tools/make_gt_pairs.py generate ... [--tp T] [--cp C]
  (the negatives are what diffusers' Wan pipeline samples: give the base model's diffusers folder as
   --scheduler to use its scheduler_config.json; --solver/--shift then override its family/shift)
  # negatives made by other generators: DIR/<generator>/<real_id>.<ext> (under torchrun: the files split over
  # the ranks, each imported once)
  python tools/make_gt_pairs.py import --store STORE --from DIR [--vae PATH] [--report FILE]
  # look at them: N pairs decoded with the store's VAE, winner left and loser right (H.264 mp4 + index.json)
  python tools/make_gt_pairs.py preview --store STORE --out DIR [--n 8] [--generator NAME] [--vae PATH]

generate and import are resumable and finish by rewriting the pair index. Exit 0 on success, 2 on a
usage error.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_regdpo.training.startup import hide_known_warnings  # imports no torch


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("generate", help="sample negatives with the base model")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="Megatron distributed checkpoint of the base model (tools/convert_checkpoint.py)")
    src.add_argument("--random-debug", action="store_true", help="a seeded random `debug` Wan (tests, demo)")
    gen.add_argument("-k", "--negatives-per-clip", type=int, default=1)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--scheduler", help="Wan diffusers folder (or its scheduler_config.json) whose scheduler "
                     "the negatives reproduce (UniPC flow or FlowMatchEuler); default: --solver and --shift")
    gen.add_argument("--solver", choices=("unipc", "euler"), help="UniPCMultistep (flow) or FlowMatchEulerDiscrete "
                     "(default: the --scheduler's, else unipc)")
    gen.add_argument("--shift", type=float, help="flow shift (default: the --scheduler's, else 5)")
    gen.add_argument("--guidance", type=float, default=5.0)
    gen.add_argument("--cfg-batch", action=argparse.BooleanOptionalAction, default=True,
                     help="conditional and unconditional passes as one forward of a doubled batch (same numbers; "
                     "--no-cfg-batch: two forwards, half the activation memory)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--generator", help="name recorded in the pair index (default: base, or debug-random)")
    gen.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    gen.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per model replica (under torchrun)")
    gen.add_argument("--cp", type=int, default=1, help="context-parallel ranks per model replica (long clips)")
    imp = sub.add_parser("import", help="import negatives made by other generators")
    imp.add_argument("--from", dest="folder", required=True, help="DIR/<generator>/<real_id>.<ext>")
    imp.add_argument("--vae", help="VAE folder (default: the one recorded in the store)")
    imp.add_argument("--report", help="JSONL of skipped files (default STORE/skipped_negatives.jsonl)")
    view = sub.add_parser("preview", help="side-by-side mp4s of winners and negatives")
    view.add_argument("--out", required=True, help="folder for the mp4 files and index.json")
    view.add_argument("--n", type=int, default=8, help="how many pairs (spread over the real clips)")
    view.add_argument("--generator", help="only this generator's negatives")
    view.add_argument("--vae", help="VAE folder (default: the one recorded in the store)")
    for p in (gen, imp, view):
        p.add_argument("--store", required=True)
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
        p.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def generate(args) -> str | None:
    """Every rank runs this; rank 0 returns the summary (the others None)."""
    import torch
    import torch.distributed as dist

    from megatron_regdpo.data.negatives import FlowScheduler, SamplerOptions, debug_arch_for, generate_negatives
    from megatron_regdpo.data.ranks import model_job, open_store
    from megatron_regdpo.data.store import GTPairStore
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.models.wan.convert import load_checkpoint
    from megatron_regdpo.parallel.groups import distributed_session

    scheduler = FlowScheduler.read(args.scheduler, args.solver, args.shift) if args.scheduler else \
        FlowScheduler(kind=args.solver or "unipc", shift=5.0 if args.shift is None else args.shift)
    opts = SamplerOptions(steps=args.steps, scheduler=scheduler, guidance=args.guidance, cfg_batch=args.cfg_batch,
                          negatives_per_clip=args.negatives_per_clip, seed=args.seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.tp < 1 or args.cp < 1 or world % (args.tp * args.cp):
        raise ValueError(f"--tp {args.tp} x --cp {args.cp} must divide the {world} ranks of this job")
    with distributed_session(args.tp, 1, args.cp) as pg:
        job = model_job(pg)
        store = open_store(job, args.store, lambda: GTPairStore(args.store, mode="a"))
        if args.ckpt:
            model, arch = load_checkpoint(args.ckpt, pg, params_dtype=dtype)
        else:
            arch = debug_arch_for(store.attrs)
            torch.manual_seed(args.seed)
            model = build_wan(arch, pg, params_dtype=dtype)
        model = model.to(args.device)
        name = args.generator or ("base" if args.ckpt else "debug-random")
        result = generate_negatives(store, model, arch, opts, name, args.device, dtype, not args.no_progress, job)
        replicas = f" on {job.dp_size} model replicas x {dist.get_world_size() // job.dp_size} ranks" \
            if job.world > 1 else ""
    if not job.lead:
        return None
    return (f"generated {result['generated']} negatives ({name}) in {result['seconds']} s{replicas}; "
            f"{result['already']} already there; pair index: {len(store.pair_index())} pairs")


def import_(args) -> str | None:
    """Every rank runs this (python, or torchrun: the files split over the ranks); rank 0 returns the summary."""
    from megatron_regdpo.data.encode import WanVAE
    from megatron_regdpo.data.errors import RoundReport
    from megatron_regdpo.data.negatives import decode_options_of, import_negatives
    from megatron_regdpo.data.ranks import open_store, start_job
    from megatron_regdpo.data.store import GTPairStore

    job = start_job(args.device)
    try:
        store = open_store(job, args.store, lambda: GTPairStore(args.store, mode="a"))
        vae = WanVAE.load(args.vae or store.attrs["vae"]["path"], args.device)
        report_path = Path(args.report or Path(args.store) / "skipped_negatives.jsonl")
        if job.lead:
            report_path.unlink(missing_ok=True)  # bad files are retried every run, so the report is per run
        report = RoundReport(report_path if job.lead else None)  # rank 0 writes every rank's skips
        result = import_negatives(store, args.folder, vae, report, decode_options_of(store.attrs, args.device),
                                  not args.no_progress, job)
    finally:
        job.close()
    if not job.lead:
        return None
    ranks = f" on {job.world} ranks" if job.world > 1 else ""
    return (f"imported {result['imported']} negatives {result['per_generator']} in {result['seconds']} s{ranks}; "
            f"{result['already']} already there; {report.summary()}; pair index: {len(store.pair_index())} pairs")


def preview(args) -> str:
    from megatron_regdpo.data.encode import WanVAE
    from megatron_regdpo.data.preview import write_previews
    from megatron_regdpo.data.store import GTPairStore

    store = GTPairStore(args.store)
    vae = WanVAE.load(args.vae, args.device) if args.vae else None
    result = write_previews(store, args.out, args.n, vae, args.device, args.generator)
    return (f"wrote {len(result.files)} previews of {result.pairs_in_store} pairs to {result.out_dir} "
            f"({result.encoder}; winner left, loser right; index.json lists them)")


def main(argv=None) -> int:
    from megatron_regdpo.training.lifecycle import exit_with_launcher, parse_on_every_rank

    exit_with_launcher()  # under torchrun: a worker does not outlive its launcher
    args = parse_on_every_rank(parse_args, argv)
    hide_known_warnings()  # before megatron-core is imported: it warns on import
    from megatron_regdpo.data.progress import quiet_library_logs
    from megatron_regdpo.data.ranks import says_errors

    quiet_library_logs()
    try:
        line = {"generate": generate, "import": import_, "preview": preview}[args.cmd](args)
    except ValueError as e:
        if says_errors():
            print(f"error: {e}", file=sys.stderr)
        return 2
    if line:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

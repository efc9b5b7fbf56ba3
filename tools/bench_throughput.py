"""Throughput sweep: a short real training run per point of a grid of config overrides.

    python tools/bench_throughput.py --config RECIPE --sweep parallel.cp=1,2 [--sweep parallel.tp=1,2 ...]
        [--set key=value ...] --world-size N --steps 6 --warmup 2 [--out runs/bench_throughput.jsonl]
        [--plot PNG] [--peak-tflops X] [--tiny-store DIR]

One JSON line per point (appended to --out): config hash, overrides, world size, machine, date, medians after
the warmup of step time, pairs/s, model and hardware TFLOP/s per device, peak GiB, MFU (with --peak-tflops),
status (ok / invalid: reason / failed: log tail). Then a markdown table on stdout. The runs (and their
end-of-run checkpoints) live in a scratch folder that is deleted afterwards unless --workdir is given.
A training run needs a GT-Pair store (data.store); --tiny-store DIR builds the demo's tiny one there if missing.
Logic: megatron_regdpo/experiments/throughput.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_regdpo.config import ConfigError, load_config  # noqa: E402
from megatron_regdpo.experiments import throughput as bench  # noqa: E402


def build_tiny_store(folder: Path) -> Path:
    """The demo's tiny GT-Pair store (clips, tiny random VAE/text encoder, debug base model's negatives)."""
    from megatron_regdpo.demo import _tool, make_clips
    from megatron_regdpo.experiments.data_ranks import save_debug_checkpoint

    store = folder / "pairs.zarr"
    if (store / "pairs").exists():  # the pair index is the last thing written
        return store
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"building a tiny GT-Pair store in {folder}", flush=True)
    if not (folder / "clips").exists():
        make_clips(folder / "clips")
    rc = _tool("preprocess_videos").main([
        "--input", str(folder / "clips"), "--store", str(store), "--frames", "9", "--fps", "8", "--short-side", "64",
        "--bucket", "1:1", "--text-len", "16", "--tiny-random-models", "--models-dir", str(folder / "models")])
    if rc:
        raise SystemExit(f"preprocess_videos failed (rc {rc})")
    save_debug_checkpoint(store, folder / "base")  # a random debug Wan fitting the store, in a process of its own
    rc = _tool("make_gt_pairs").main(["generate", "--store", str(store), "--ckpt", str(folder / "base"), "-k", "1",
                                      "--steps", "4"])
    if rc:
        raise SystemExit(f"make_gt_pairs failed (rc {rc})")
    return store


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML recipe")
    ap.add_argument("--sweep", action="append", default=[], help="KEY=V1,V2,... (repeat: cartesian product)")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="KEY=VALUE for every point")
    ap.add_argument("--world-size", type=int, default=1, help="ranks per run (torchrun --nproc-per-node)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--out", default="runs/bench_throughput.jsonl", help="JSONL, one line appended per point")
    ap.add_argument("--plot", default=None, help="PNG of step time and pairs/s per point")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device, for MFU")
    ap.add_argument("--tiny-store", type=Path, default=None, help="build (if missing) and use a tiny store here")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a deleted tmp dir)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run")
    args = ap.parse_args(argv)
    if args.warmup >= args.steps:
        ap.error(f"--warmup {args.warmup} leaves no step of --steps {args.steps} to measure")
    try:
        base = load_config(args.config, args.sets)
        points = bench.expand_sweep(args.sweep, base)
    except (ConfigError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    sets = list(args.sets)
    if args.tiny_store is not None:
        sets.append(f"data.store={build_tiny_store(args.tiny_store.resolve())}")
    elif base.data.store is None:
        print("error: no data.store in the recipe: pass --set data.store=STORE or --tiny-store DIR", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        workdir = args.workdir or Path(tmp)
        records = []
        for i, point in enumerate(points):
            print(f"[{i + 1}/{len(points)}] {' '.join(point) or '(base)'}", flush=True)
            records.append(bench.run_point(args.config, point, sets=sets, world_size=args.world_size,
                                           steps=args.steps, warmup=args.warmup, workdir=workdir,
                                           peak_tflops=args.peak_tflops, timeout=args.timeout))
            print(f"  {records[-1]['status'].splitlines()[0]}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for r in records:
            f.write(json.dumps({"config": str(args.config), **r}) + "\n")
    machine = records[0]["machine"] if records else bench.machine()
    print(f"\n{args.config}, world size {args.world_size}, {args.steps} steps (medians after {args.warmup}), "
          f"{machine['node']}, {machine['device']}; MFU: "
          f"{f'model TFLOP/s / {args.peak_tflops}' if args.peak_tflops else 'null (no --peak-tflops)'}")
    print(bench.summarize(records))
    if args.plot:
        print(f"plot: {bench.write_plot(records, args.plot, title=f'{Path(args.config).name}, {args.world_size} ranks')}")
    print(f"records appended to {out}")
    return 1 if any(r["status"].startswith("failed") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

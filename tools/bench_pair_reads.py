#!/usr/bin/env python
"""What a training step waits for its pairs, with and without data.prefetch, at a real clip's latent size.

    python tools/bench_pair_reads.py [--workdir DIR] [--repeats 5] [--compute-factor 2]
        [--out runs/bench_pair_reads.jsonl] [--quick]

Writes a store of 2 x repeats synthetic Wan2.1 I2V pairs at 720x1280, 81 frames under --workdir (default: a
temporary folder, deleted), reads them through the trainer's PairDataset and Prefetcher with two stand-ins
for the step (cpu: matmuls on this machine's cores; wait: the trainer's thread blocked, as while a GPU
computes), appends one JSON line per stand-in to --out and prints a summary of each. The pairs are read
twice each at most from the same process, so the OS page cache may serve them: a lower bound on a shared
file system's read time. --quick: tiny latents, 2 repeats (checks the plumbing; its timings mean nothing).
Logic: megatron_regdpo/experiments/pair_reads.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUICK = {"latents": (4, 3, 8, 8), "cond": (8, 3, 8, 8), "image": (4, 8), "text": (8, 16)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="where the store goes (default: a temporary folder, deleted afterwards)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compute-factor", type=float, default=2.0, help="the stand-in step, in pair reads")
    ap.add_argument("--out", default="runs/bench_pair_reads.jsonl")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    from megatron_regdpo.experiments import pair_reads

    repeats = 2 if args.quick else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.workdir or tmp) / "pairs.zarr"
        kw = {"shapes": QUICK} if args.quick else {}
        try:
            dataset = pair_reads.make_store(store, 2 * repeats, **kw)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        records = [{"bench": "pair_reads", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "quick": args.quick,
                    **pair_reads.measure(dataset, repeats, args.compute_factor, step)} for step in ("cpu", "wait")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            print(pair_reads.summarize(record))
    print(f"records appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Throughput of preprocessing and negative generation on 1 rank vs several (torchrun), in one run.

  python tools/bench_data_ranks.py [--clips 16] [--steps 10] [--layouts 1x2,2x1,1x1] [--out runs/bench_data_ranks.jsonl]
      [--workdir /tmp/bench_data_ranks] [--quick]

A layout RxT is R ranks with T threads each (OMP_NUM_THREADS); the first layout is the baseline of the
ratios. Writes one JSONL row per (step, layout) and prints a markdown table (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="sampler steps per negative")
    ap.add_argument("--layouts", default="1x2,2x1,1x1", help="RANKSxTHREADS, comma-separated")
    ap.add_argument("--out", default="runs/bench_data_ranks.jsonl")
    ap.add_argument("--workdir", default="/tmp/bench_data_ranks")
    ap.add_argument("--quick", action="store_true", help="4 clips, 2 steps (a smoke run)")
    args = ap.parse_args(argv)
    try:
        layouts = [tuple(int(x) for x in item.split("x")) for item in args.layouts.split(",")]
        assert layouts and all(len(lt) == 2 and min(lt) >= 1 for lt in layouts)
    except (ValueError, AssertionError):
        print(f"error: --layouts {args.layouts!r}: want RANKSxTHREADS[,RANKSxTHREADS...], e.g. 1x2,2x1",
              file=sys.stderr)
        return 2
    from megatron_regdpo.experiments.data_ranks import run, table

    clips, steps = (4, 2) if args.quick else (args.clips, args.steps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = run(Path(args.workdir), out, clips, steps, layouts)
    print(table(rows))
    print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

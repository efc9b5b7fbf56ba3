#!/usr/bin/env python
"""Bytes communicated per training step per parallel layout (CPU, gloo), against the analytic model.

  python tools/bench_comm.py [--layouts TP2,CP2,...] [--out runs/bench_comm.jsonl]

Prints a markdown table (bytes per rank, min-max over ranks) and writes one JSON line per rank and layout.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    from megatron_regdpo.experiments.comm import LAYOUTS, run_layouts
    from megatron_regdpo.parallel.spawn import run_world

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names")
    ap.add_argument("--out", default="runs/bench_comm.jsonl")
    args = ap.parse_args(argv)
    names = [n for n in args.layouts.split(",") if n]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        print(f"unknown layout(s) {unknown}; choose from {list(LAYOUTS)}", file=sys.stderr)
        return 2
    rows = []
    for world in sorted({LAYOUTS[n]["world"] for n in names}):
        group = [n for n in names if LAYOUTS[n]["world"] == world]
        for rank_rows in run_world(world, run_layouts, group):
            rows += rank_rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = {"machine": platform.node(), "date": time.strftime("%Y-%m-%d"), "backend": "gloo (CPU)"}
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps({**stamp, **r}) + "\n")
    print("| layout | world | measured bytes/rank | expected bytes/rank | match |")
    print("|---|---|---|---|---|")
    for name in names:
        rs = [r for r in rows if r["layout"] == name]
        meas = sorted(r["measured_total"] for r in rs)
        exp = sorted(r["expected_total"] for r in rs)
        same = all(r["measured"] == r["expected"] for r in rs)
        fmt = lambda v: f"{v[0]:,}" if v[0] == v[-1] else f"{v[0]:,}-{v[-1]:,}"  # noqa: E731
        print(f"| {name} | {rs[0]['world']} | {fmt(meas)} | {fmt(exp)} | {'exact' if same else 'DIFFERS'} |")
    for r in rows:
        if r["measured"] != r["expected"]:
            print(f"{r['layout']} rank {r['rank']} {r['coords']}:\n  measured {r['measured']}\n  expected {r['expected']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

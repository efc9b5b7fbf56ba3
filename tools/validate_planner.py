"""Validate the capacity planner against measured peak memory of small configs on CPU gloo ranks.

    python tools/validate_planner.py [--cases 0,2] [--out runs/validate_planner.jsonl]

Per case and rank: the peak measured by torch's profiler (CPU allocator totals) over the whole run and over
the step, the planner's prediction for the same rank (fake tensors, fake process group) and the relative
error. Exits 1 when an error exceeds --tolerance (default 10%). Cases: megatron_regdpo/experiments/planner_check.py
(0-7 megatron-core DDP layouts, 8-10 FSDP2: DP2 full fine-tuning, DP2 LoRA, CP2; 11-12 activation
offloading: one rank LoRA, FSDP2 CP2).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=None, help="comma-separated case indices (default: all)")
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--out", default="runs/validate_planner.jsonl")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from megatron_regdpo.config import load_config
    from megatron_regdpo.experiments.planner_check import SMALL, VALIDATION_CASES, validate_config

    picked = range(len(VALIDATION_CASES)) if args.cases is None else [int(i) for i in args.cases.split(",")]
    rows, worst = [], 0.0
    print("| case | world | rank | measured step MiB | planned step MiB | error | measured run MiB | planned run MiB | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i in picked:
        name, world, overrides = VALIDATION_CASES[i]
        cfg = load_config(ROOT / "recipes/base/wan_debug.yaml", [*SMALL, *overrides])
        for r in validate_config(cfg, world):
            m, p, e = r["measured"], r["planned"], r["rel_error"]
            worst = max(worst, abs(e["step"]), abs(e["whole_run"]))
            print(f"| {name} | {world} | {r['rank']} | {m['step'] / 2**20:.2f} | {p['step'] / 2**20:.2f} | "
                  f"{e['step']:+.1%} | {m['whole_run'] / 2**20:.2f} | {p['whole_run'] / 2**20:.2f} | {e['whole_run']:+.1%} |",
                  flush=True)
            rows.append({"case": name, "world": world, "overrides": [*SMALL, *overrides],
                         "date": datetime.datetime.now().isoformat(timespec="seconds"), **r})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"worst relative error {worst:.1%} (tolerance {args.tolerance:.0%}); records appended to {args.out}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())

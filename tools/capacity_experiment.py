"""The capacity experiment: largest frames per clip for Wan2.1-I2V-14B Reg-DPO pairs at 720x1280 on 8 x 80 GB.

    python tools/capacity_experiment.py [--variants 0,3,5] [--hints 15:124] [--jobs 2]
        [--out runs/capacity_14b_i2v.jsonl]
    python tools/capacity_experiment.py --table runs/capacity_14b_i2v.jsonl    # the table again, no planning

Rows: (a) the FSDP2-only baseline, (b) each technique added to it alone, the techniques stacked, (c) candidate
best layouts (megatron_regdpo/experiments/capacity.py). Each row is a capacity-planner frame search; one JSON
line per row is appended to --out and a markdown table is printed. --hints ROW:LATENT,...: start a row's
search at that many latent frames (e.g. an earlier answer; two plans when it is still the answer).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing as mp
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _one(args):
    index, total_gib, reserve_gib, host_gib, hint = args
    warnings.filterwarnings("ignore")
    from megatron_regdpo.experiments.capacity import run_variant
    from megatron_regdpo.capacity.planner import Budget

    t0 = time.perf_counter()
    row = run_variant(index, Budget(total_gib, reserve_gib, host_gib), hint)
    return index, row, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=None, help="comma-separated row indices (default: all)")
    ap.add_argument("--hints", default="", help="ROW:LATENT,... latent frames to start a row's search at")
    ap.add_argument("--jobs", type=int, default=1, help="rows searched in parallel (one process each)")
    ap.add_argument("--gpu-gib", type=float, default=79.6)
    ap.add_argument("--reserve-gib", type=float, default=4.0)
    ap.add_argument("--host-gib", type=float, default=250.0, help="host memory per GPU (offloaded activations)")
    ap.add_argument("--out", default="runs/capacity_14b_i2v.jsonl")
    ap.add_argument("--table", default=None, help="print the table of this JSONL (the last line per row) and exit")
    args = ap.parse_args(argv)
    from megatron_regdpo.experiments.capacity import VARIANTS, row_from_record, table
    from megatron_regdpo.capacity.planner import Budget

    if args.table:
        records = {}
        for line in Path(args.table).read_text().splitlines():
            record = json.loads(line)
            records[record["index"]] = record
        print(table([row_from_record(records[i]) for i in sorted(records)]))
        return 0

    picked = range(len(VARIANTS)) if args.variants is None else [int(i) for i in args.variants.split(",")]
    hints = {int(r): int(n) for r, n in (h.split(":") for h in args.hints.split(",") if h)}
    work = [(i, args.gpu_gib, args.reserve_gib, args.host_gib, hints.get(i)) for i in picked]
    rows = {}
    # a fresh process per row (spawn): the fake world owns torch.distributed while it runs
    with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        for index, row, seconds in pool.imap_unordered(_one, work):
            rows[index] = row
            print(f"[{index}] {row.name}: {row.search.frames} frames ({row.search.evaluations} plans, {seconds:.0f} s)",
                  flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps({"date": datetime.datetime.now().isoformat(timespec="seconds"), "index": index,
                                    "seconds": seconds, **dataclasses.asdict(row)}) + "\n")
    ordered = [rows[i] for i in sorted(rows)]
    print(f"\nWan2.1-I2V-14B, 720x1280, 8 GPUs; budget {Budget(args.gpu_gib, args.reserve_gib, args.host_gib).describe()}")
    print(table(ordered))
    return 0


if __name__ == "__main__":
    sys.exit(main())

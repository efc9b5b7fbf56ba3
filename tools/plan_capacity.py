"""Capacity planner: peak memory per GPU of a configured Reg-DPO training step, without a GPU.

    python tools/plan_capacity.py --config RECIPE --world-size N [key.sub=value ...]
        [--max-frames] [--gpu-gib 79.6] [--reserve-gib 4] [--json OUT.jsonl]

Runs the real training step (policy forward/backward with the configured recompute, the reference pass,
optimizer state and update, LoRA or full) at real size under FakeTensorMode with a fake process group of
the configured world size, and prints the heaviest rank's peak by category (weights, grads, optimizer,
activations, reference). FSDP2 (parallel.fsdp) runs as in the trainer; what cannot run here is modelled
and named in the output (TE layers, FP8). --max-frames searches the largest 4k+1 frame count per clip that fits the budget.
Logic: megatron_regdpo/capacity/.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_regdpo.config import ConfigError, load_config  # noqa: E402


def record(mem, **extra) -> dict:
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), **extra, **dataclasses.asdict(mem)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML recipe")
    ap.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    ap.add_argument("--max-frames", action="store_true", help="search the largest frame count that fits")
    ap.add_argument("--gpu-gib", type=float, default=79.6, help="memory per GPU as torch reports it (H100 80GB: 79.6)")
    ap.add_argument("--reserve-gib", type=float, default=4.0, help="left for CUDA context, NCCL, fragmentation")
    ap.add_argument("--json", default=None, help="append the result as one JSON line here")
    ap.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from megatron_regdpo.capacity.planner import Budget, format_plan, max_frames, plan

    budget = Budget(args.gpu_gib, args.reserve_gib)
    try:
        cfg = load_config(args.config, args.overrides)
        t0 = time.perf_counter()
        if args.max_frames:
            found = max_frames(cfg, args.world_size, budget)
            mem = found.plan
        else:
            mem, found = plan(cfg, args.world_size), None
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    print(f"# {args.config} {' '.join(args.overrides)} on {args.world_size} GPUs ({seconds:.0f} s of simulation)")
    extra = {"config": args.config, "overrides": args.overrides, "budget": budget.describe(), "seconds": seconds}
    if found is not None:
        print(f"largest clip that fits: {found.frames} frames ({found.evaluations} plans); "
              f"{found.over_frames} frames needs "
              + (f"{found.over.peak / 2**30:.2f} GiB" if found.over else "(invalid layout or past the search limit)"))
        extra.update(max_frames=found.frames, over_frames=found.over_frames,
                     over_peak=found.over.peak if found.over else None)
    if mem is not None:
        print(format_plan(mem, budget))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            f.write(json.dumps(record(mem, **extra) if mem else extra) + "\n")
    return 0 if mem is None or mem.peak <= budget.usable or found is not None else 1


if __name__ == "__main__":
    sys.exit(main())

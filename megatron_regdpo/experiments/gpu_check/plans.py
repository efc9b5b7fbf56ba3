"""The capacity planner's predictions for the step configs, computed in a child process with CUDA hidden.

The planner (capacity/planner.py) is a CPU tool: it runs the step under FakeTensorMode in a fake world,
and megatron-core's CUDA assumptions are answered by parallel/cpu_compat.py, which is applied only where
CUDA is absent. So on the GPU machine it runs as it runs on a login node: in a child with
CUDA_VISIBLE_DEVICES="" (which also lets it run beside the measured steps, a few children at a time).

    python -m megatron_regdpo.experiments.gpu_check.plans '<json: [{"name", "recipe", "overrides"}]>'
prints one JSON line: name -> {peak, peak_phase, breakdown, layout, tokens, simulated_as} or {error}.
"""
from __future__ import annotations

import json
import sys
import time
import traceback

from .runner import last_json_line


def plan_configs(jobs: list[dict]) -> dict:
    from megatron_regdpo.capacity.planner import plan
    from megatron_regdpo.config import load_config

    out = {}
    for job in jobs:
        try:
            mem = plan(load_config(job["recipe"], list(job["overrides"])), 1)
            out[job["name"]] = {"peak": mem.peak, "peak_phase": mem.peak_phase, "breakdown": mem.breakdown,
                                "static": mem.static, "layout": mem.layout, "tokens": mem.tokens,
                                "simulated_as": mem.simulated_as}
        except Exception as e:  # noqa: BLE001 - one config's error is that config's result
            out[job["name"]] = {"error": f"{type(e).__name__}: {e}"[:1000], "traceback": traceback.format_exc()[-3000:]}
    return out


def start(ctx, jobs: list[dict], per_child: int = 2) -> list:
    """Start the children (`per_child` configs each: a plan is single-threaded Python); returns handles."""
    env = ctx.subprocess_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    return [ctx.start_process([sys.executable, "-m", __name__, json.dumps(jobs[i:i + per_child])], env)
            for i in range(0, len(jobs), per_child)]


def collect(ctx, handles: list, timeout: float) -> dict:
    """name -> plan (or {error}) for every job; a child that failed gives each of its jobs that error."""
    deadline = time.monotonic() + timeout
    out = {}
    for proc, log in handles:
        rc, text, timed_out = ctx.finish_process(proc, log, timeout=deadline - time.monotonic())
        if timed_out or rc != 0:
            out[f"child {proc.pid}"] = {"error": f"planner child {'timed out' if timed_out else f'failed (rc {rc})'}: "
                                                 f"{text[-1500:]}"}
        else:
            out.update(last_json_line(text))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(json.dumps(plan_configs(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

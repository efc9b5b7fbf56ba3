"""(d) The 1.3B Reg-DPO training step, for real on the device, against its FLOPs and its memory plan.

Each config is the 1.3B recipe with one pair on one device, run by the planner's own step
(capacity/simulate.py with fake=False: build_wan, LoRA, megatron-core DDP and optimizer, the reference
mode, keyed-noise micro-batches of random latents, the reference pass, forward/backward through
megatron-core's schedule, the update), with the weights filled on the device (weights.py).
- step_s: from the end of the build to the end of the update (host clock after a device synchronize),
  with the planner's memory tracker active (a dispatch mode: host work that overlaps the device's);
- FLOPs from models/wan/flops.py: model (policy 3 x forward) and hardware (+ reference forward +
  recompute); MFU = model TFLOP/s over the matmul TFLOP/s measured in (a), HFU likewise for hardware;
- peak: the allocator's peak over the step (torch.cuda.max_memory_allocated from the step's start) against
  plan() of the same config (plans.py, computed beside the runs with CUDA hidden). On the CPU the
  allocator has no peak counter: the tracker's peak stands in (`measured_by`).
Configs: a warm-up (untimed figures, small clip), the headline configs at 81 frames (LoRA, full fine-tuning,
and full fine-tuning with FSDP2 over the one GPU: its fp32 master shards, gathers and reduce-scatters, against
the DDP row), and a recompute sweep (none / selective / full, and full with activation offloading: its time cost) at a
frame count where no recompute still fits.
"""
from __future__ import annotations

import gc
import time
import traceback
from pathlib import Path

import torch

from megatron_regdpo.capacity.simulate import simulate_step
from megatron_regdpo.config import load_config, validate
from megatron_regdpo.models.wan.arch import resolve_arch
from megatron_regdpo.models.wan.flops import wan_step_flops
from megatron_regdpo.parallel.groups import distributed_session

from . import plans
from .lean_cost import lean_cost
from .sizes import RECIPE
from .timing import peak_bytes, peak_bytes_reset, sync
from .weights import randomize_linears_

GiB = 2**30
LORA = ("lora.rank=16", "objective.reference.mode=lora_base")
FULL_FT = ("lora.rank=0", "objective.reference.mode=resident", "model.recompute=full")
MAIN = (("lora16_full", "LoRA r16, lora_base reference, full recompute", (*LORA, "model.recompute=full")),
        ("fullft_full", "full fine-tuning, resident reference, full recompute", FULL_FT),
        ("fsdp2_fullft_full", "FSDP2 (one GPU), full fine-tuning, resident reference sharded, full recompute",
         (*FULL_FT, "parallel.fsdp=true")))
SWEEP = tuple((f"sweep_{r}", f"LoRA r16, lora_base, recompute {r}", (*LORA, f"model.recompute={r}"))
              for r in ("none", "selective", "full")) + (
    ("sweep_full_offload", "LoRA r16, lora_base, full recompute, layer inputs offloaded to pinned host memory",
     (*LORA, "model.recompute=full", "model.offload_activations=true")),)


def _jobs(sizes) -> list[dict]:
    at = lambda frames: (*sizes.overrides, f"data.frames={frames}")  # noqa: E731
    jobs = [{"name": "warmup", "description": "untimed warm-up (library loads, kernel selection)",
             "overrides": (*at(sizes.warmup_frames), *MAIN[0][2])}]
    jobs += [{"name": n, "description": d, "overrides": (*at(sizes.main_frames), *o)} for n, d, o in MAIN]
    jobs += [{"name": n, "description": d, "overrides": (*at(sizes.sweep_frames), *o)} for n, d, o in SWEEP]
    return jobs


def measure(cfg, device: str, matmul_tflops: float | None) -> dict:
    """One real step of `cfg` on `device`: time, FLOP rates, peak memory."""
    arch = resolve_arch(cfg.model)
    layout = validate(cfg, 1, arch)
    mark = {}

    def on_step_start():
        sync(device)
        peak_bytes_reset(device)
        mark["t0"] = time.perf_counter()

    with distributed_session(world_size=1) as pg:
        real = simulate_step(cfg, 1, fake=False, pg=pg, device=device, on_step_start=on_step_start,
                             on_built=randomize_linears_)
        sync(device)
        step_s = time.perf_counter() - mark["t0"]
        allocator_peak = peak_bytes(device)
    flops = wan_step_flops(arch, layout.latent_shape, cfg.data.text_len, pairs=cfg.data.global_batch_pairs,
                           reference_forward=cfg.objective.reference.mode != "cached", recompute=cfg.model.recompute)
    row = {"frames": cfg.data.frames, "latent": list(layout.latent_shape), "tokens_per_clip": layout.tokens,
           "lora_rank": cfg.lora.rank, "reference": cfg.objective.reference.mode, "recompute": cfg.model.recompute,
           "step_s": step_s, "model_tflop": flops["model"] / 1e12, "hardware_tflop": flops["hardware"] / 1e12,
           "model_tflops": flops["model"] / step_s / 1e12, "hardware_tflops": flops["hardware"] / step_s / 1e12,
           "tracked_peak_gib": real.peak / GiB, "tracked_peak_phase": real.peak_phase}
    if matmul_tflops:
        row["mfu"] = row["model_tflops"] / matmul_tflops
        row["hfu"] = row["hardware_tflops"] / matmul_tflops
    measured = allocator_peak if allocator_peak is not None else real.peak
    row["measured_by"] = "cuda allocator" if allocator_peak is not None else "tracker (CPU: no allocator peak)"
    row["peak_gib"] = measured / GiB
    return row


def _add_plan(row: dict, planned: dict | None) -> None:
    if not planned:
        row["plan"] = "missing"
    elif "error" in planned:
        row["plan"] = planned["error"]
    else:
        row["planned_peak_gib"] = planned["peak"] / GiB
        row["plan_rel_error"] = planned["peak"] / (row["peak_gib"] * GiB) - 1
        row["plan_within_10pct"] = abs(row["plan_rel_error"]) <= 0.10


def _recompute_cost(rows: dict) -> dict:
    base = rows.get("sweep_none")
    if not base or "step_s" not in base:
        return {"note": "no recompute=none run to compare with"}
    out = {}
    for r in ("selective", "full", "full_offload"):
        row = rows.get(f"sweep_{r}")
        if row and "step_s" in row:
            out[r] = {"time_vs_none": row["step_s"] / base["step_s"],
                      "peak_vs_none": row["peak_gib"] / base["peak_gib"],
                      "hardware_flop_vs_none": row["hardware_tflop"] / base["hardware_tflop"]}
    return out


def run(ctx) -> dict:
    sizes = ctx.sizes
    recipe = str(Path(ctx.repo_root) / RECIPE)
    jobs = _jobs(sizes)
    planner = plans.start(ctx, [{"name": j["name"], "recipe": recipe, "overrides": j["overrides"]}
                                for j in jobs if j["name"] != "warmup"], sizes.plans_per_child)
    env = ctx.result_of("environment")
    matmul, capacity = env.get("matmul_tflops"), env.get("memory_gib")
    rows, failures, skipped, last_s = {}, [], [], 0.0
    for job in jobs:
        if ctx.time_left() < 2.5 * last_s + 5:
            skipped.append({"config": job["name"],
                            "reason": f"time: {ctx.time_left():.0f} s left, the last run took {last_s:.0f} s"})
            continue
        t0 = time.monotonic()
        try:
            row = {"config": job["name"], "description": job["description"],
                   **measure(load_config(recipe, list(job["overrides"])), ctx.device, matmul)}
        except Exception as e:  # noqa: BLE001 - the next config still runs
            row = {"config": job["name"], "error": f"{type(e).__name__}: {e}"[:1000],
                   "traceback": traceback.format_exc()[-3000:]}
            if isinstance(e, torch.cuda.OutOfMemoryError):
                row["error"] = "out of memory (see the plan of this config): " + row["error"]
            else:
                failures.append(f"{job['name']}: {type(e).__name__}: {e}"[:300])
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        last_s = time.monotonic() - t0
        row["wall_s"] = last_s
        rows[job["name"]] = row
    planned = plans.collect(ctx, planner, timeout=max(ctx.time_left(), 5))
    failures += [f"{name}: {p['error']}"[:300] for name, p in planned.items() if name.startswith("child ")]
    for name, row in rows.items():
        if name == "warmup":
            continue
        if "step_s" in row:
            _add_plan(row, planned.get(name))
        elif "peak" in planned.get(name, {}):
            row["planned_peak_gib"] = planned[name]["peak"] / GiB
        if capacity:
            row["capacity_gib"] = capacity
    result = {"recipe": RECIPE, "overrides": list(sizes.overrides), "configs": list(rows.values()),
              "recompute_cost": _recompute_cost(rows), "skipped": skipped, "failures": failures}
    main = rows.get(MAIN[0][0], {})
    if "tokens_per_clip" in main and ctx.time_left() > 5:
        try:
            arch = resolve_arch(load_config(recipe, list(_jobs(sizes)[1]["overrides"])).model)
            result["lean"] = lean_cost(main["tokens_per_clip"], 2, arch.num_heads, arch.head_dim, arch.num_layers,
                                       ctx.device, iters=sizes.timing_iters)
        except Exception as e:  # noqa: BLE001
            result["lean"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    else:
        result["lean"] = {"skipped": "no headline run to size it, or no time left"}
    return result


def summary(r: dict) -> str:
    parts = []
    for row in r["configs"]:
        if row["config"] == "warmup":
            continue
        if "step_s" not in row:
            parts.append(f"{row['config']}: {row.get('error', 'no result')[:60]}")
            continue
        s = f"{row['config']}: {row['step_s']:.3g} s"
        if "mfu" in row:
            s += f", MFU {row['mfu']:.2f}"
        s += f", peak {row['peak_gib']:.3g} GiB"
        if "planned_peak_gib" in row:
            s += f" (plan {row['planned_peak_gib']:.3g})"
        parts.append(s)
    return "; ".join(parts[:3]) + (f" (+{len(parts) - 3} more)" if len(parts) > 3 else "")

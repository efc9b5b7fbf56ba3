"""The planner's validation: measure a real step's peak memory on CPU ranks and compare it with the plan.

Measurement is independent of the planner's tracker: torch's profiler records every allocation of the
CPU allocator with the running total it reports (`total_allocated`). Each spawned gloo rank runs the same
step on real tensors (capacity/simulate.py with fake=False) under the profiler:
- whole run: the highest running total from before the model is built (nothing of ours is live then);
- the step: the tensors live when the step starts, counted by walking the garbage collector's objects
  (unique storages), plus the highest running total reached during the step above its value at the start.
The plan of the same config and rank comes from the fake world (capacity/simulate.py with fake=True).
"""
from __future__ import annotations

import gc

import torch

MARKER_BYTES = 40_961  # an allocation of this odd size marks the start of the step in the profile


def live_tensor_bytes() -> int:
    """Bytes of the unique storages of every tensor the garbage collector can reach."""
    from megatron_regdpo.capacity.tracker import inner_tensors

    seen, total = set(), 0
    tensors = (i for obj in gc.get_objects() if isinstance(obj, torch.Tensor) for i in inner_tensors(obj))
    for t in tensors:  # a DTensor's memory is its local shard's
        if t.layout == torch.strided and t.device.type == "cpu":
            st = t.untyped_storage()
            if st.data_ptr() not in seen and st.nbytes():
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def _allocations(prof) -> list:
    from torch._C._profiler import _EventType

    out, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            out.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated))
        stack.extend(e.children)
    return sorted(out)


def measured_peaks(prof, live_at_step: int) -> dict:
    events = _allocations(prof)
    split = next(i for i, (_, size, _) in enumerate(events) if size == MARKER_BYTES)
    at_split = events[split][2] - MARKER_BYTES
    return {"whole_run": max(total for _, _, total in events),
            "step": live_at_step + max(total for _, _, total in events[split + 2:]) - at_split}


def measure_rank(rank: int, world: int, payload: dict) -> dict:
    """Spawned-rank entry (parallel/spawn.py): the real step under the profiler, and this rank's plan."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_regdpo.capacity.simulate import simulate_step
    from megatron_regdpo.config import from_dict
    from megatron_regdpo.parallel.collective_wrap import settled_collectives
    from megatron_regdpo.parallel.groups import destroy_distributed, groups_from_config

    cfg = from_dict(payload["cfg"])
    marks = {}

    def mark():
        marks["live"] = live_tensor_bytes()
        torch.empty(MARKER_BYTES, dtype=torch.uint8)   # freed at once: only its allocation event matters

    pg = groups_from_config(cfg.parallel, seed=cfg.run.seed)
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    # settled: a gloo worker thread letting go of a collective's buffer after the caller did would move
    # the real step's peak by that buffer in some runs (parallel/collective_wrap.py)
    with settled_collectives() as unsettled:
        prof.start()
        real = simulate_step(cfg, world, rank, fake=False, granule=1, pg=pg, on_step_start=mark)
        prof.stop()
    destroy_distributed()
    measured = measured_peaks(prof, marks["live"])
    planned = simulate_step(cfg, world, rank, fake=True, granule=1)
    # on a CPU host memory (the cpu_swap reference's copy, offloaded activations) is the same pool: count both
    return {"rank": rank, "measured": measured,
            "planned": {"whole_run": planned.peak_with_host_overall, "step": planned.peak_with_host},
            "tracked_real": {"whole_run": real.peak_with_host_overall, "step": real.peak_with_host},
            "planned_breakdown": planned.breakdown,
            "planned_peak_phase": planned.peak_phase, "unsettled_collectives": unsettled["calls"],
            "layout": planned.layout, "tokens": planned.tokens}


def validate_config(cfg, world_size: int) -> list[dict]:
    """Per rank: measured vs planned peaks (bytes) and their relative errors, for `cfg` on gloo ranks."""
    from megatron_regdpo.parallel.spawn import run_world

    results = run_world(world_size, measure_rank, {"cfg": cfg.to_dict()})
    for r in results:
        r["rel_error"] = {k: r["planned"][k] / r["measured"][k] - 1 for k in ("whole_run", "step")}
    return results


# A small Wan (4 layers, hidden 256) on 17 frames of 128x128 (320 tokens per clip): activations dominate,
# as at scale. Each case: (name, world size, overrides on recipes/base/wan_debug.yaml).
SMALL = ("model.num_layers=4", "model.num_heads=8", "model.head_dim=32", "model.ffn_dim=1024", "model.text_dim=256",
         "data.frames=17", "data.height=128", "data.width=128")
VALIDATION_CASES = (
    ("full FT, fp32, resident reference", 1, ()),
    ("LoRA r8, bf16, lora_base, full recompute", 1,
     ("precision.params_dtype=bf16", "lora.rank=8", "objective.reference.mode=lora_base", "model.recompute=full")),
    ("TP2+SP, bf16, selective recompute", 2,
     ("parallel.tp=2", "parallel.sequence_parallel=true", "precision.params_dtype=bf16", "model.recompute=selective")),
    ("CP2, LoRA, lora_base, separate pair forwards", 2,
     ("parallel.cp=2", "lora.rank=8", "objective.reference.mode=lora_base", "objective.pair_forward=separate")),
    ("TP2, cpu_swap reference", 2, ("parallel.tp=2", "objective.reference.mode=cpu_swap")),
    ("PP2, cached reference, 2 micro-batches", 2,
     ("parallel.pp=2", "objective.reference.mode=cached", "data.global_batch_pairs=2")),
    ("DP2, bf16, distributed optimizer", 2,
     ("precision.params_dtype=bf16", "parallel.distributed_optimizer=true", "data.global_batch_pairs=2")),
    ("TP2xCP2, bf16, LoRA, full recompute", 4,
     ("parallel.tp=2", "parallel.cp=2", "precision.params_dtype=bf16", "lora.rank=8", "model.recompute=full")),
    # FSDP2 (parallel.fsdp): weights, gradients and optimizer state sharded over DP x CP, the resident
    # reference too; each unit's all-gather and reduce-scatter buffers come and go during the step
    ("FSDP2 DP2, full FT, fp32, resident reference", 2, ("parallel.fsdp=true", "data.global_batch_pairs=2")),
    ("FSDP2 DP2, bf16, LoRA r8, lora_base", 2,
     ("parallel.fsdp=true", "data.global_batch_pairs=2", "precision.params_dtype=bf16", "lora.rank=8",
      "objective.reference.mode=lora_base")),
    ("FSDP2 CP2, bf16, full FT, resident reference, full recompute", 2,
     ("parallel.fsdp=true", "parallel.cp=2", "precision.params_dtype=bf16", "model.recompute=full")),
    # the layer inputs offloaded to host memory (on a CPU the same pool: planned device + host together)
    ("LoRA r8, bf16, lora_base, full recompute, offloaded activations", 1,
     ("precision.params_dtype=bf16", "lora.rank=8", "objective.reference.mode=lora_base", "model.recompute=full",
      "model.offload_activations=true")),
    ("FSDP2 CP2, bf16, full FT, full recompute, offloaded activations", 2,
     ("parallel.fsdp=true", "parallel.cp=2", "precision.params_dtype=bf16", "model.recompute=full",
      "model.offload_activations=true")),
)


def measure_cuda_step(cfg) -> dict:
    """On one GPU: the real step's peak (torch.cuda.max_memory_allocated from the start of the step) and
    the plan of the same config. For the planner's GPU validation (tests/gpu/test_planner_gpu.py)."""
    from megatron_regdpo.capacity.simulate import simulate_step
    from megatron_regdpo.parallel.groups import destroy_distributed, distributed_session

    with distributed_session(world_size=1) as pg:
        real = simulate_step(cfg, 1, fake=False, pg=pg, device="cuda",
                             on_step_start=lambda: (torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()))
        measured = torch.cuda.max_memory_allocated()
    destroy_distributed()
    planned = simulate_step(cfg, 1, fake=True, device="cuda")  # megatron allocates on the GPU here
    return {"device": torch.cuda.get_device_name(), "measured_step": measured, "planned_step": planned.peak,
            "tracked_real_step": real.peak, "rel_error": planned.peak / measured - 1,
            "planned_breakdown": planned.breakdown}

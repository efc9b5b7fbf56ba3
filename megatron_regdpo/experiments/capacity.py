"""The capacity experiment: largest frame count per clip for Wan2.1-I2V-14B Reg-DPO pairs at 720x1280 on
8 GPUs of 80 GB, for an FSDP2-only baseline, each technique added to it alone, the techniques stacked one
by one, and candidate best layouts. Every row is a max_frames search of the capacity planner.

The baseline (a) is what a plain port does: FSDP2 (parallel.fsdp, the trainer's weight sharding) over all
8 GPUs, full fine-tuning, a resident reference copy (sharded like the policy, as the trainer does), no
context parallelism, no recompute, winner and loser in separate forwards. Every row is a layout the trainer
accepts: the cpu_swap reference (refused with FSDP by config validation) and TE FP8 with one pair per
micro-batch (refused by its GEMM shape rule, config/te_shapes.py) have no row.
"""
from __future__ import annotations

import dataclasses

from megatron_regdpo.capacity.planner import Budget, FrameSearch, max_frames
from megatron_regdpo.config import load_config

RECIPE = "recipes/base/wan_14b_i2v.yaml"
WORLD = 8
BASELINE = ("data.height=720", "data.width=1280", "data.micro_batch_pairs=1", "parallel.fsdp=true",
            "parallel.cp=1", "model.recompute=none", "objective.pair_forward=separate", "lora.rank=0",
            "objective.reference.mode=resident", "precision.fp8=none", "model.backend=local")


def _pairs(cp: int, tp: int = 1) -> str:
    return f"data.global_batch_pairs={WORLD // (cp * tp)}"   # one pair per data-parallel rank


LORA = ("lora.rank=16", "lora.alpha=32")
# (group, name, overrides on top of BASELINE)
VARIANTS = (
    ("a", "FSDP2-only baseline", (_pairs(1),)),
    ("b", "+ joint pair forward", (_pairs(1), "objective.pair_forward=joint")),
    ("b", "+ selective recompute (core attention)", (_pairs(1), "model.recompute=selective")),
    ("b", "+ full recompute", (_pairs(1), "model.recompute=full")),
    ("b", "+ CP 2", ("parallel.cp=2", _pairs(2))),
    ("b", "+ CP 4", ("parallel.cp=4", _pairs(4))),
    ("b", "+ CP 8", ("parallel.cp=8", _pairs(8))),
    ("b", "+ reference cached", (_pairs(1), "objective.reference.mode=cached")),
    ("b", "+ LoRA r16 (reference still resident)", (_pairs(1), *LORA)),
    ("b", "+ LoRA r16, reference = base with adapters off", (_pairs(1), *LORA, "objective.reference.mode=lora_base")),
    ("stack", "joint + full recompute", (_pairs(1), "objective.pair_forward=joint", "model.recompute=full")),
    ("stack", "... + CP 8", ("objective.pair_forward=joint", "model.recompute=full", "parallel.cp=8", _pairs(8))),
    ("stack", "... + LoRA r16 + lora_base reference",
     ("objective.pair_forward=joint", "model.recompute=full", "parallel.cp=8", _pairs(8), *LORA,
      "objective.reference.mode=lora_base")),
    ("c", "no FSDP: CP 8, LoRA, lora_base, full recompute (weights whole per GPU)",
     ("parallel.fsdp=false", "objective.pair_forward=joint", "model.recompute=full", "parallel.cp=8", _pairs(8),
      *LORA, "objective.reference.mode=lora_base")),
    ("c", "TP 2 + SP x CP 4, LoRA, lora_base, full recompute (no FSDP)",
     ("parallel.fsdp=false", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.cp=4", _pairs(4, 2),
      "objective.pair_forward=joint", "model.recompute=full", *LORA, "objective.reference.mode=lora_base")),
    ("c", "FSDP2, CP 8, LoRA, lora_base, full recompute, separate pair forwards",
     ("model.recompute=full", "parallel.cp=8", _pairs(8), *LORA, "objective.reference.mode=lora_base")),
    # the saved layer inputs of full recompute in host memory (model.offload_activations), <= 250 GiB per GPU
    ("d", "... + activation offloading (FSDP2, CP 8, LoRA, lora_base, full recompute, separate)",
     ("model.recompute=full", "model.offload_activations=true", "parallel.cp=8", _pairs(8), *LORA,
      "objective.reference.mode=lora_base")),
    ("d", "... + activation offloading, joint pair forward",
     ("model.recompute=full", "model.offload_activations=true", "objective.pair_forward=joint", "parallel.cp=8",
      _pairs(8), *LORA, "objective.reference.mode=lora_base")),
)


@dataclasses.dataclass
class Row:
    group: str
    name: str
    overrides: tuple
    search: FrameSearch


def run_variant(index: int, budget: Budget, hint: int | None = None) -> Row:
    """`hint`: latent frames to start the search at (planner.max_frames)."""
    group, name, extra = VARIANTS[index]
    overrides = (*BASELINE, *extra)
    cfg = load_config(RECIPE, list(overrides))
    return Row(group, name, overrides, max_frames(cfg, WORLD, budget, hint=hint))


def row_from_record(record: dict) -> Row:
    """A Row back from its JSON line (tools/capacity_experiment.py --table)."""
    from megatron_regdpo.capacity.simulate import StepMemory

    search = dict(record["search"])
    for key in ("plan", "over"):
        search[key] = StepMemory(**search[key]) if search[key] else None
    return Row(record["group"], record["name"], tuple(record["overrides"]), FrameSearch(**search))


def table(rows: list[Row]) -> str:
    """Markdown, one line per row. Ratios are to the baseline (a), or, when (a) fits no frame count, to the
    first row (in table order) that fits anything, named in the header."""
    GiB = 2**30
    ref = next((r for r in rows if r.search.frames), None)
    ref_name = "-" if ref is None else ("(a)" if ref.group == "a" else f"'{ref.name.lstrip('+ ')}'")
    lines = [f"| group | configuration | frames per clip | x {ref_name} | peak GiB at that length | "
             "next length tried: GiB | weights / grads / optimizer / activations / reference GiB at the peak | "
             "peak in | host GiB/GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, p = r.search, r.search.plan
        over = f"{s.over_frames}: {s.over.peak / GiB:.1f}" if s.over else "-"
        if p is None:
            lines.append(f"| {r.group} | {r.name} | 0 | - | - | {over} | - | - | - |")
            continue
        cats = " / ".join(f"{p.breakdown.get(c, 0) / GiB:.1f}" for c in
                          ("weights", "grads", "optimizer", "activations", "reference"))
        lines.append(f"| {r.group} | {r.name} | {s.frames} | {s.frames / ref.search.frames:.1f} | {p.peak / GiB:.1f} | "
                     f"{over} | {cats} | {p.peak_phase} | {p.host_peak / GiB:.1f} |")
    return "\n".join(lines)

"""The capacity experiment: largest frame count per clip for Wan2.1-I2V-14B Reg-DPO pairs at 720x1280 on
8 GPUs of 80 GB, for an FSDP-only baseline, each technique added to it alone, the techniques stacked one
by one, and candidate best layouts. Every row is a max_frames search of the capacity planner.

The baseline (a) is what a plain port does: Megatron-FSDP over all 8 GPUs, full fine-tuning, a resident
reference copy, no context parallelism, no recompute, winner and loser in separate forwards.
"""
from __future__ import annotations

import dataclasses

from megatron_regdpo.config import load_config

from .planner import Budget, FrameSearch, max_frames

RECIPE = "recipes/base/wan_14b_i2v.yaml"
WORLD = 8
BASELINE = ("data.height=720", "data.width=1280", "data.micro_batch_pairs=1", "parallel.fsdp=true",
            "parallel.cp=1", "model.recompute=none", "objective.pair_forward=separate", "lora.rank=0",
            "objective.reference.mode=resident", "precision.fp8=none", "model.backend=local")


def _pairs(cp: int, tp: int = 1) -> str:
    return f"data.global_batch_pairs={WORLD // (cp * tp)}"   # one pair per data-parallel rank


LORA = ("lora.rank=16", "lora.alpha=32")
FP8 = ("model.backend=te", "precision.fp8=delayed")
# (group, name, overrides on top of BASELINE)
VARIANTS = (
    ("a", "FSDP-only baseline", (_pairs(1),)),
    ("b", "+ joint pair forward", (_pairs(1), "objective.pair_forward=joint")),
    ("b", "+ selective recompute (core attention)", (_pairs(1), "model.recompute=selective")),
    ("b", "+ full recompute", (_pairs(1), "model.recompute=full")),
    ("b", "+ CP 2", ("parallel.cp=2", _pairs(2))),
    ("b", "+ CP 4", ("parallel.cp=4", _pairs(4))),
    ("b", "+ CP 8", ("parallel.cp=8", _pairs(8))),
    ("b", "+ reference cpu_swap", (_pairs(1), "objective.reference.mode=cpu_swap")),
    ("b", "+ reference cached", (_pairs(1), "objective.reference.mode=cached")),
    ("b", "+ LoRA r16 (reference still resident)", (_pairs(1), *LORA)),
    ("b", "+ LoRA r16, reference = base with adapters off", (_pairs(1), *LORA, "objective.reference.mode=lora_base")),
    ("b", "+ FP8 (TE, delayed scaling)", (_pairs(1), *FP8)),
    ("stack", "joint + full recompute", (_pairs(1), "objective.pair_forward=joint", "model.recompute=full")),
    ("stack", "... + CP 8", ("objective.pair_forward=joint", "model.recompute=full", "parallel.cp=8", _pairs(8))),
    ("stack", "... + LoRA r16 + lora_base reference",
     ("objective.pair_forward=joint", "model.recompute=full", "parallel.cp=8", _pairs(8), *LORA,
      "objective.reference.mode=lora_base")),
    ("stack", "... + FP8",
     ("objective.pair_forward=joint", "model.recompute=full", "parallel.cp=8", _pairs(8), *LORA,
      "objective.reference.mode=lora_base", *FP8)),
    ("c", "no FSDP: CP 8, LoRA, lora_base, full recompute (weights whole per GPU)",
     ("parallel.fsdp=false", "objective.pair_forward=joint", "model.recompute=full", "parallel.cp=8", _pairs(8),
      *LORA, "objective.reference.mode=lora_base")),
    ("c", "TP 2 + SP x CP 4, LoRA, lora_base, full recompute (no FSDP)",
     ("parallel.fsdp=false", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.cp=4", _pairs(4, 2),
      "objective.pair_forward=joint", "model.recompute=full", *LORA, "objective.reference.mode=lora_base")),
)


@dataclasses.dataclass
class Row:
    group: str
    name: str
    overrides: tuple
    search: FrameSearch


def run_variant(index: int, budget: Budget) -> Row:
    group, name, extra = VARIANTS[index]
    overrides = (*BASELINE, *extra)
    cfg = load_config(RECIPE, list(overrides))
    return Row(group, name, overrides, max_frames(cfg, WORLD, budget))


def table(rows: list[Row], baseline_frames: int) -> str:
    GiB = 2**30
    lines = ["| group | configuration | frames per clip | x (a) | peak GiB at that length | next length tried: GiB | "
             "weights / grads / optimizer / activations / reference GiB at the peak | host GiB/GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, p = r.search, r.search.plan
        ratio = "-" if not baseline_frames else f"{s.frames / baseline_frames:.1f}"
        cats = " / ".join(f"{p.breakdown.get(c, 0) / GiB:.1f}" for c in
                          ("weights", "grads", "optimizer", "activations", "reference")) if p else "-"
        over = f"{s.over_frames}: {s.over.peak / GiB:.1f}" if s.over else "-"
        lines.append(f"| {r.group} | {r.name} | {s.frames} | {ratio} | {p.peak / GiB:.1f} | {over} | {cats} | "
                     f"{(p.host / GiB if p else 0):.1f} |" if p else
                     f"| {r.group} | {r.name} | 0 | - | - | {over} | - | - |")
    return "\n".join(lines)

"""The capacity planner: peak memory per GPU for a config, and the largest clip that fits a budget.

    mem = plan(cfg, world_size)                      # StepMemory of the heaviest rank
    best = max_frames(cfg, world_size, Budget())     # FrameSearch: frames per clip, and its plan

`plan` simulates the configured training step (capacity/simulate.py) on the ranks whose memory can differ
(the first and last pipeline stage; every other rank repeats one of them), then applies the analytic
model of what cannot run here (capacity/analytic.py: TE FP8). FSDP2 (parallel.fsdp) runs in the simulation.
"""
from __future__ import annotations

import dataclasses

import torch

from megatron_regdpo.config import ConfigError, validate, with_overrides
from megatron_regdpo.models.wan.arch import resolve_arch

from .analytic import apply_fp8
from .simulate import StepMemory, simulate_step
from .tracker import CATEGORIES

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Budget:
    """Bytes a rank's tensors may take: the card's memory as torch reports it (H100 80 GB: 79.6 GiB)
    minus a reserve for what torch's allocator statistics do not count or waste (CUDA context, NCCL
    buffers, allocator fragmentation)."""

    total_gib: float = 79.6
    reserve_gib: float = 4.0
    host_gib: float = 250.0   # host memory per GPU for offloaded activations and a cpu_swap reference (2 TB / 8)

    @property
    def usable(self) -> int:
        return int((self.total_gib - self.reserve_gib) * GiB)

    @property
    def host_usable(self) -> int:
        return int(self.host_gib * GiB)

    def fits(self, mem: StepMemory) -> bool:
        return mem.peak <= self.usable and mem.host_peak <= self.host_usable

    def describe(self) -> str:
        return (f"{self.total_gib:g} GiB card - {self.reserve_gib:g} GiB reserve = {self.usable / GiB:.1f} GiB for "
                f"tensors; {self.host_gib:g} GiB host memory per GPU")


def planning_device() -> str:
    """Where the simulated step's tensors live: the device megatron-core itself allocates on here. On a GPU
    host megatron's DDP buffers go to torch.cuda.current_device() whatever the caller asks, so a plan on
    "cpu" there would mix devices; fake CUDA tensors take no GPU memory."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def plan(cfg, world_size: int) -> StepMemory:
    """The heaviest rank's memory over one training step of `cfg` on `world_size` GPUs."""
    arch = resolve_arch(cfg.model)
    layout = validate(cfg, world_size, arch)
    # megatron's rank order puts pipeline stages outermost: the last stage starts at world - world/pp
    ranks = sorted({0, world_size - world_size // layout.pp})
    mems = [simulate_step(cfg, world_size, rank, device=planning_device()) for rank in ranks]
    out = []
    for mem in mems:
        if cfg.precision.fp8 != "none":
            mem = apply_fp8(mem, arch, cfg)
        out.append(mem)
    return max(out, key=lambda m: m.peak)


def latent_frames_to_frames(latent: int) -> int:
    return 4 * (latent - 1) + 1


@dataclasses.dataclass
class FrameSearch:
    frames: int                        # 0: not even one latent frame fits
    plan: StepMemory | None            # at `frames` (None when 0)
    over: StepMemory | None            # at the next frame count tried that did not fit
    over_frames: int
    evaluations: int


def max_frames(cfg, world_size: int, budget: Budget, limit_latent: int = 512, hint: int | None = None) -> FrameSearch:
    """The largest 4k+1 frame count per clip whose plan fits `budget` (frame counts the layout rejects,
    e.g. tokens not divisible by CP, count as not fitting). Memory grows with frames: an affine guess from
    1 and 2 latent frames, galloping up from it, then bisection. `hint` (latent frames, e.g. an earlier
    answer): start there instead, galloping down while it does not fit (two plans when it is the answer)."""
    tried: dict[int, StepMemory | None] = {}

    def at(latent: int) -> StepMemory | None:
        if latent not in tried:
            trial = with_overrides(cfg, [f"data.frames={latent_frames_to_frames(latent)}"])
            try:
                tried[latent] = plan(trial, world_size)
            except ConfigError:
                tried[latent] = None
        return tried[latent]

    def fits(latent: int) -> bool:
        mem = at(latent)
        return mem is not None and budget.fits(mem)

    # peak memory is close to affine in the frame count: two plans give a guess, a few more bracket it
    lo, hi = 0, 1                      # fits(lo) (0 = nothing); hi: the first count to try above it
    if hint is not None and fits(hint):
        lo, hi = hint, hint + 1
    elif hint is not None:             # gallop down: hi does not fit, lo = hi - step does (or 0)
        step, hi = 1, hint
        while hi - step >= 1 and not fits(hi - step):
            hi, step = hi - step, 2 * step
        lo = max(hi - step, 0)
    elif fits(1):
        lo, hi = 1, 2
        one, two = at(1), at(2)
        if two is not None and two.peak > one.peak:
            guess = 1 + int((budget.usable - one.peak) // (two.peak - one.peak))
            hi = max(2, min(guess, limit_latent))
            if fits(hi):
                lo, hi = hi, hi + 1
    while hi <= limit_latent and fits(hi):   # gallop up
        lo, hi = hi, hi + 2 * (hi - lo)
    hi = min(hi, limit_latent + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    over = tried.get(hi) if hi <= limit_latent else None
    return FrameSearch(frames=latent_frames_to_frames(lo) if lo else 0, plan=tried.get(lo),
                       over=over, over_frames=latent_frames_to_frames(hi), evaluations=len(tried))


def format_plan(mem: StepMemory, budget: Budget | None = None) -> str:
    """A per-category table of the peak (GiB, or MiB below 1 GiB), the phases, and what was modelled."""
    unit, div = ("GiB", GiB) if mem.peak >= GiB else ("MiB", 2**20)
    lines = [f"layout: {mem.layout}; {mem.tokens:,} video tokens per clip; rank {mem.rank} of {mem.world_size}",
             "", f"| category ({unit}) | resident before the step | at the peak |", "|---|---|---|"]
    for c in CATEGORIES:
        lines.append(f"| {c} | {mem.static.get(c, 0) / div:.2f} | {mem.breakdown.get(c, 0) / div:.2f} |")
    lines.append(f"| **total** | {sum(mem.static.get(c, 0) for c in CATEGORIES) / div:.2f} | **{mem.peak / div:.2f}** |")
    lines += ["", f"peak per phase ({unit}): " + ", ".join(f"{ph} {v / div:.2f}" for ph, v in mem.phase_peaks.items()),
              f"peak in: {mem.peak_phase}"]
    if mem.host_peak:
        lines.append(f"host memory at its peak (cpu_swap reference copy, offloaded activations): "
                     f"{mem.host_peak / div:.2f} {unit} per rank")
    for key, how in mem.simulated_as.items():
        lines.append(f"simulated as: {key} {how}")
    lines += [f"modelled: {n}" for n in mem.notes]
    if budget is not None:
        verdict = "fits" if budget.fits(mem) else "does NOT fit"
        lines.append(f"budget: {budget.describe()}: {verdict} ({mem.peak / GiB:.2f} GiB)")
    return "\n".join(lines)

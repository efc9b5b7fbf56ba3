"""What the GPU check measures, at the GPU's sizes and at the CPU smoke test's: one table, two columns.

The GPU sizes fit the whole check in 8 minutes of wall time on one H100 or H200 (every step has its own
limit, the sum under the budget); the smoke sizes run the same code on a 2-core CPU in about a minute.
Plain data: importing this module imports no torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_regdpo.models.wan.arch import SIZES

RECIPE = "recipes/wan1.3b/regdpo_t2v_h100x8.yaml"   # the 1.3B recipe: 480p, 81 frames, full recompute
# every step (d)/(e) config: one pair on one device, local layers (Transformer Engine cannot travel)
ONE_PAIR = ("model.backend=local", "data.global_batch_pairs=1", "data.micro_batch_pairs=1")


@dataclass(frozen=True)
class ParityCase:
    name: str
    arch: object           # WanArch
    batch: int
    latent: tuple          # (F, H, W) of the latent
    text_len: int


@dataclass(frozen=True)
class Sizes:
    mode: str                         # "gpu" or "cpu-smoke"
    budget_s: float                   # the whole check, install included: the watchdog ends the run here
    limits_s: dict                    # step name -> seconds
    matmul_n: int                     # (a) n x n x n bf16 product
    copy_bytes: int                   # (a) device-to-device copy
    parity: tuple                     # (b) ParityCases
    kernel_shapes: tuple              # (c) (N, M) correctness cases
    kernel_bench_m: tuple             # (c) elements per sample timed (N = 2: a winner and a loser)
    timing_iters: int
    recipe_overrides: tuple           # (d), (e): on top of RECIPE and ONE_PAIR (the smoke test shrinks it)
    main_frames: int                  # (d) the headline configs
    sweep_frames: int                 # (d) the recompute sweep (frames at which no recompute fits)
    warmup_frames: int                # (d) one untimed step first: library loads, kernel selection
    plans_per_child: int              # (d) planner configs per child process (children run side by side)
    sample_steps: int = 50            # (e) UniPC steps per clip
    guidance: float = 5.0             # (e) CFG scale (two forwards per step)
    sample_shift: float = 3.0         # (e) Wan's suggestion for 480p

    @property
    def overrides(self) -> tuple:
        return ONE_PAIR + self.recipe_overrides


GPU = Sizes(
    mode="gpu", budget_s=465.0,
    limits_s={"install": 45, "environment": 25, "parity": 45, "kernel": 40, "step": 160, "sampling": 50,
              "gpu_tests": 95},
    matmul_n=8192, copy_bytes=2 * 2**30,
    parity=(ParityCase("debug", SIZES["debug"], 2, (3, 8, 12), 64),
            ParityCase("1.3B-width layer", dataclasses.replace(SIZES["1.3B"], num_layers=1), 2, (5, 30, 52), 512)),
    kernel_shapes=((1, 1), (4, 1025), (2, 4_838_400)),   # few launch shapes: each is a Triton compile
    kernel_bench_m=(4_838_400, 16_777_216),   # a 14B 720p latent, a large one
    timing_iters=10,
    recipe_overrides=(),
    main_frames=81, sweep_frames=29, warmup_frames=5, plans_per_child=2,
)

SMOKE = Sizes(
    mode="cpu-smoke", budget_s=300.0,
    limits_s={"install": 30, "environment": 20, "parity": 40, "kernel": 60, "step": 90, "sampling": 20,
              "gpu_tests": 60},
    matmul_n=256, copy_bytes=16 * 2**20,
    parity=(ParityCase("debug", SIZES["debug"], 2, (3, 8, 12), 16),
            ParityCase("debug-width layer", dataclasses.replace(SIZES["debug"], num_layers=1), 1, (2, 4, 8), 16)),
    kernel_shapes=((1, 1), (4, 1025), (3, 5000)),
    kernel_bench_m=(8192,),
    timing_iters=3,
    recipe_overrides=("model.size=debug", "data.height=32", "data.width=32", "data.text_len=16"),
    main_frames=9, sweep_frames=5, warmup_frames=5, plans_per_child=5,
    sample_steps=4,
)

"""The analytic model of TE FP8 applied to a simulated step, checked by hand (FSDP2 is simulated, not modelled:
test_fsdp2_plan.py)."""
from __future__ import annotations

from megatron_regdpo.capacity.analytic import apply_fp8, fp8_delta
from megatron_regdpo.capacity.simulate import StepMemory
from megatron_regdpo.config import load_config
from megatron_regdpo.models.wan.arch import resolve_arch

MiB = 2**20


def _mem(**kw) -> StepMemory:
    static = {"weights": 800 * MiB, "grads": 800 * MiB, "optimizer": 4800 * MiB, "activations": 0,
              "reference": 0, "host": 0}
    base = sum(static.values())
    fields = dict(rank=0, world_size=8, layout="TP=1 PP=1 CP=1 DP=8 (world 8)", tokens=1000,
                  peak=base + 3000 * MiB, peak_phase="forward_backward",
                  breakdown={**static, "activations": 3000 * MiB},
                  phase_peaks={"data": base, "reference": base + 100 * MiB, "forward_backward": base + 3000 * MiB,
                               "optimizer": base + 1600 * MiB},
                  phase_breakdowns={"data": dict(static), "reference": {**static, "activations": 100 * MiB},
                                    "forward_backward": {**static, "activations": 3000 * MiB},
                                    "optimizer": {**static, "optimizer": 6400 * MiB}},
                  static=static, host=0, peak_overall=base + 3000 * MiB,
                  sizes={"layer_weight_bytes": 20 * MiB, "layer_grad_bytes": 20 * MiB, "layer_linear_params": 5 * MiB})
    fields.update(kw)
    return StepMemory(**fields)


def test_fp8_delta_by_hand():
    cfg = load_config("recipes/base/wan_14b.yaml", ["model.recompute=full", "parallel.cp=4", "data.frames=81"])
    arch = resolve_arch(cfg.model)
    mem = _mem(tokens=75600)
    tokens = 2 * 75600 // 4
    saved = tokens * 3 * arch.hidden + tokens * arch.ffn_dim        # bf16 -> fp8: one byte per element
    assert fp8_delta(mem, arch, cfg) == 2 * 5 * MiB - saved        # one live layer under full recompute
    no_recompute = load_config("recipes/base/wan_14b.yaml", ["model.recompute=none", "parallel.cp=4"])
    assert fp8_delta(mem, arch, no_recompute) == arch.num_layers * (2 * 5 * MiB - saved)
    after = apply_fp8(mem, arch, cfg)
    assert after.phase_peaks["forward_backward"] == mem.phase_peaks["forward_backward"] + fp8_delta(mem, arch, cfg)
    assert after.phase_peaks["optimizer"] == mem.phase_peaks["optimizer"]

"""Transformer Engine's FP8 GEMM and context-parallel shape rules in validate (config/te_shapes.py), on CPU:
the numbers in each message, the fixes each message suggests (each one then validates), and the rules'
scope (the te backend; FP8 rules only with precision.fp8)."""
from __future__ import annotations

import pytest

from megatron_regdpo.config import ConfigError, load_config, validate
from megatron_regdpo.config.te_shapes import fp8_gemm_rows, forward_batches
from megatron_regdpo.models.wan.arch import resolve_arch

T2V_14B = "recipes/wan14b/regdpo_t2v_h100x64.yaml"   # TP4 + SP, CP4, DP4 on 64, FP8
I2V_14B = "recipes/wan14b/regdpo_i2v_h100x8.yaml"    # CP4, DP2 on 8
T2V_1B = "recipes/wan1.3b/regdpo_t2v_h100x8.yaml"    # DP8 on 8, 480p


def check(recipe: str, world: int, *overrides: str):
    cfg = load_config(recipe, list(overrides))
    return validate(cfg, world, resolve_arch(cfg.model))


def errors(recipe: str, world: int, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check(recipe, world, *overrides)
    return info.value.errors


def test_fp8_video_rows_of_the_64_gpu_layout_at_one_pair():
    [msg] = errors(T2V_14B, 64, "data.micro_batch_pairs=1")
    assert ("precision.fp8='delayed' needs FP8 GEMM inputs with rows a multiple of 8: linear_qkv/linear_q/linear_fc1 "
            "gets 75,600 video tokens / cp 4 / tp 4 (sequence parallel) = 4,725 rows per sample x 2 samples "
            "(2 x data.micro_batch_pairs=1, objective.pair_forward='joint') = 9,450 (mod 8 = 2)") in msg
    assert ("fits with data.frames=77 or 93, parallel.sequence_parallel=false (18,900 rows per sample), "
            "or data.micro_batch_pairs=4") in msg
    # every suggested fix validates
    for fix in (["data.frames=77"], ["data.frames=93"], ["parallel.sequence_parallel=false"],
                ["data.micro_batch_pairs=4"]):
        check(T2V_14B, 64, "data.micro_batch_pairs=1", *fix)


def test_shipped_recipe_runs_four_pairs_per_forward():
    layout = check(T2V_14B, 64)
    assert layout.tokens == 75_600 and (layout.tp, layout.cp, layout.dp) == (4, 4, 4)


def test_fp8_image_rows_of_i2v():
    [msg] = errors(I2V_14B, 8, "precision.fp8=delayed")
    assert ("linear_kv_img gets 257 CLIP image tokens = 257 rows per sample x 2 samples "
            "(2 x data.micro_batch_pairs=1, objective.pair_forward='joint') = 514 (mod 8 = 2)") in msg
    assert "fits with data.micro_batch_pairs=4 (and data.global_batch_pairs a multiple of dp x 4 = 8)" in msg
    check(I2V_14B, 8, "precision.fp8=delayed", "data.micro_batch_pairs=4", "data.global_batch_pairs=8")


def test_fp8_text_rows():
    [msg] = errors(T2V_1B, 8, "precision.fp8=current", "data.text_len=510")
    assert "linear_kv gets data.text_len=510 text tokens = 510 rows per sample x 2 samples" in msg
    assert "= 1,020 (mod 8 = 4); fits with data.text_len=512, or data.micro_batch_pairs=2" in msg
    check(T2V_1B, 8, "precision.fp8=current")


def test_separate_pair_forwards_halve_the_batch():
    overrides = ("data.frames=77", "data.micro_batch_pairs=1")   # 4,500 rows per sample
    check(T2V_14B, 64, *overrides)                                 # x 2 = 9,000
    [msg] = errors(T2V_14B, 64, *overrides, "objective.pair_forward=separate")
    assert "x 1 samples (data.micro_batch_pairs=1, objective.pair_forward='separate') = 4,500 (mod 8 = 4)" in msg


def test_the_last_evaluation_micro_batch_counts():
    check(T2V_14B, 64, "eval.interval=10", "eval.holdout_pairs=32")
    [msg] = errors(T2V_14B, 64, "eval.interval=10", "eval.holdout_pairs=10")
    # dp 4 ranks hold 3, 3, 2, 2 held-out pairs: a last micro-batch of 2 pairs, 4 samples
    assert ("x 4 samples (the last evaluation micro-batch of 2 pairs: eval.holdout_pairs=10 over dp=4 "
            "is not a multiple of dp x micro_batch_pairs = 16) = 18,900 (mod 8 = 4)") in msg


def test_fp8_widths():
    [msg] = errors("recipes/base/wan_debug.yaml", 1, "model.backend=te", "precision.params_dtype=bf16",
                   "precision.fp8=delayed", "model.ffn_dim=72")
    assert msg == "precision.fp8='delayed' needs FP8 GEMM widths that are multiples of 16: ffn 72 / tp 1 = 72"


def test_te_context_parallel_needs_an_even_chunk():
    # 480p, 81 frames: 32,760 tokens; CP 8 leaves 4,095 per rank (the local backend only needs tokens % cp)
    overrides = ("parallel.cp=8", "data.global_batch_pairs=1")
    [msg] = errors(T2V_1B, 8, *overrides)
    assert ("parallel.cp_comm='all_gather' with model.backend='te' needs an even number of video tokens per CP "
            "rank (TE splits each rank's chunk in two): 32,760 / cp 8 = 4,095; fits with data.frames=77 or 85, "
            "or parallel.cp=4") in msg
    for comm in ("p2p", "a2a"):
        assert "4,095" in errors(T2V_1B, 8, *overrides, f"parallel.cp_comm={comm}")[0]
    check(T2V_1B, 8, *overrides, "model.backend=local")
    check(T2V_1B, 8, *overrides, "data.frames=77")
    check(T2V_1B, 8, "parallel.cp=4", "data.global_batch_pairs=2")


def test_te_a2a_needs_heads_per_tp_rank_divisible_by_cp():
    overrides = ("parallel.cp_comm=a2a", "precision.fp8=none")
    [msg] = errors(T2V_14B, 64, *overrides)
    assert ("parallel.cp_comm='a2a' with model.backend='te' needs the heads per TP rank divisible by parallel.cp: "
            "40 heads / tp 4 = 10, not divisible by cp 4; fits with parallel.cp_comm='all_gather' or 'p2p'") in msg
    check(T2V_14B, 64, *overrides, "parallel.tp=2", "data.global_batch_pairs=32")   # 20 heads per rank, cp 4


def test_rules_apply_to_te_only():
    check(T2V_14B, 64, "data.micro_batch_pairs=1", "model.backend=local", "precision.fp8=none",
          "parallel.cp_comm=all_gather")
    check(T2V_14B, 64, "data.micro_batch_pairs=1", "precision.fp8=none")   # TE, no FP8: CP chunk 18,900 is even


def test_gemm_rows_and_batches():
    cfg = load_config(I2V_14B, ["parallel.tp=2", "parallel.sequence_parallel=true"])
    assert [(name, rows) for name, rows, _ in fp8_gemm_rows(cfg, 75_600, 257)] == [
        ("linear_qkv/linear_q/linear_fc1", 9_450), ("linear_kv", 512), ("linear_kv_img", 257)]
    assert [b for b, _ in forward_batches(cfg, dp=1)] == [2]
    cfg = load_config(I2V_14B, ["objective.pair_forward=separate", "data.micro_batch_pairs=2",
                                "eval.interval=1", "eval.holdout_pairs=5"])
    assert [b for b, _ in forward_batches(cfg, dp=2)] == [1, 2]   # ranks hold 3 and 2: a last micro-batch of 1

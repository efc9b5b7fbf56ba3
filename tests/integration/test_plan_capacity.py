"""tools/plan_capacity.py end to end (subprocesses: the fake world needs a process without a distributed
world of its own): the paper's 14B I2V recipe on 8 GPUs, the frame search, FSDP2, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "plan_capacity.py"


def _run(tmp_path, *args) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "plan.jsonl"
    proc = subprocess.run([sys.executable, str(TOOL), "--json", str(out), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return proc, records


@pytest.mark.slow
def test_paper_recipe_14b_i2v_on_8_gpus(tmp_path):
    proc, [rec] = _run(tmp_path, "--config", "recipes/wan14b/regdpo_i2v_h100x8.yaml", "--world-size", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TP=1 PP=1 CP=4 DP=2" in proc.stdout and "| activations |" in proc.stdout and "(GiB)" in proc.stdout
    # 16,394,878,784 base parameters in bf16 (+ the rank-16 adapters), whole on every CP rank
    assert 2 * 16_394_878_784 < rec["static"]["weights"] < 2 * 16_394_878_784 * 1.01
    lora_bytes = rec["static"]["weights"] - 2 * 16_394_878_784
    assert rec["static"]["grads"] == pytest.approx(lora_bytes, rel=0.01)           # bf16 grads of the adapters
    assert rec["static"]["optimizer"] == pytest.approx(6 * lora_bytes, rel=0.01)   # fp32 main + two Adam moments
    assert rec["static"]["reference"] == 0                                          # lora_base: adapters off
    assert 0 < rec["breakdown"]["activations"] < rec["peak"] < 75.6 * 2**30
    assert sum(rec["breakdown"][c] for c in ("weights", "grads", "optimizer", "activations", "reference")) == rec["peak"]
    assert rec["simulated_as"] == {"model.backend": "te -> local"}


def test_frame_search_brackets_the_budget(tmp_path):
    proc, [rec] = _run(tmp_path, "--config", "recipes/base/wan_debug.yaml", "--world-size", "2", "--max-frames",
                       "--gpu-gib", "0.02", "--reserve-gib", "0", "parallel.cp=2", "data.height=128", "data.width=128")
    assert proc.returncode == 0, proc.stderr[-2000:]
    budget = int(0.02 * 2**30)
    assert rec["max_frames"] >= 5 and rec["max_frames"] % 4 == 1
    assert rec["peak"] <= budget < rec["over_peak"]
    assert rec["over_frames"] > rec["max_frames"]
    assert f"largest clip that fits: {rec['max_frames']} frames" in proc.stdout


def test_fsdp2_is_run_not_modelled(tmp_path):
    """parallel.fsdp is FSDP2, run in the fake world as the trainer builds it (tests/unit/capacity/
    test_fsdp2_plan.py checks the shards against DDP): no gradient buffer between steps, Adam's two fp32
    moments beside the fp32 master shards, nothing replaced or modelled."""
    proc, [rec] = _run(tmp_path, "--config", "recipes/base/wan_debug.yaml", "--world-size", "4",
                       "data.global_batch_pairs=4", "parallel.fsdp=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rec["static"]["grads"] <= 512 and rec["breakdown"]["activations"] > 0
    # (+ one 512-byte block per small tensor: each step count, each bias moment)
    assert rec["static"]["optimizer"] == pytest.approx(2 * rec["static"]["weights"], rel=0.15)
    assert not rec["simulated_as"] and not rec["notes"] and "modelled:" not in proc.stdout


def test_distributed_optimizer_keeps_weights_as_weights(tmp_path):
    """DDP moves the parameters into its contiguous buffer for the distributed optimizer: still weights; the
    optimizer state is sharded over the data-parallel ranks (run, not modelled)."""
    args = ("--config", "recipes/base/wan_debug.yaml", "--world-size", "4", "data.global_batch_pairs=4",
            "precision.params_dtype=bf16")
    _, [ddp] = _run(tmp_path, *args)
    proc, [dist_opt] = _run(tmp_path / "d", *args, "parallel.distributed_optimizer=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # one buffer instead of many small tensors each rounded to 512-byte blocks: a few percent less
    assert ddp["static"]["weights"] * 0.9 < dist_opt["static"]["weights"] <= ddp["static"]["weights"]
    assert dist_opt["static"]["optimizer"] < 0.4 * ddp["static"]["optimizer"]
    assert not dist_opt["simulated_as"]


def test_bad_input_names_the_key(tmp_path):
    proc, recs = _run(tmp_path, "--config", "recipes/base/wan_debug.yaml", "model.recompte=full")
    assert proc.returncode == 2 and "model.recompte" in proc.stderr and not recs
    proc, _ = _run(tmp_path, "--config", "recipes/base/wan_debug.yaml", "--world-size", "3", "parallel.tp=2")
    assert proc.returncode == 2 and "world size 3" in proc.stderr
    proc, _ = _run(tmp_path, "--config", "recipes/base/wan_debug.yaml", "--world-size", "4", "parallel.pp=2",
                   "parallel.virtual_pp=2", "model.num_layers=4")
    assert proc.returncode == 2 and "parallel.virtual_pp=2 is not supported" in proc.stderr     # as the trainer
    proc, _ = _run(tmp_path, "--config", "recipes/base/wan_debug.yaml", "--world-size", "2", "parallel.fsdp=true",
                   "objective.reference.mode=cpu_swap")
    assert proc.returncode == 2 and "cpu_swap" in proc.stderr                                 # as the trainer

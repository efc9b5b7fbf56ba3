"""What a training run prints before step 1: the start-up summary (fresh and resumed), and no known-harmless
third-party warning, with one line saying they are hidden."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from megatron_regdpo.training.startup import HARMLESS, SHOW_ENV

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "debug" / "tiny_cpu.yaml")


def _summary(out: str) -> list[str]:
    lines = out.splitlines()
    start = lines.index("== run tiny-cpu")
    return lines[start:next(i for i, line in enumerate(lines) if line.startswith("step 1/") or
                            line.startswith("step 3/"))]


def test_summary_before_step_one_fresh_then_resumed(store, tmp_path, capsys):
    from megatron_regdpo.train import main

    args = ["--config", RECIPE, f"data.store={store}", f"run.output_dir={tmp_path}", "objective.beta=50",
            "data.global_batch_pairs=2", "data.small_buckets=drop", "eval.holdout_pairs=0"]
    capsys.readouterr()
    assert main([*args, "schedule.train_steps=2"]) == 0
    fresh = _summary(capsys.readouterr().out)
    run_dir = tmp_path / "tiny-cpu"
    assert fresh == [
        "== run tiny-cpu",
        "model     Wan2.1 debug t2v: 147,200 parameters, 147,200 trainable, 0 frozen; full fine-tuning",
        "precision fp32, backend local, fp8 none, recompute none, reference resident",
        "layout    world 1: tp 1 pp 1 cp 1 dp 1",
        f"data      {store}: 3 pairs (3 train, 0 held out)",
        "buckets   by latent shape (data.small_buckets=drop):",
        "  16x3x8x8: 3 pairs, 2 trained per epoch (1 batch)",
        "batch     2 pairs per step (1 per micro-batch, dp 1); an epoch is 1 step",
        "steps     2 = 2.00 epochs, lr 0.0001 constant",
        f"checkpoints {run_dir / 'checkpoints'} (at the end, keep 2); metrics {run_dir}",
        "start     fresh, from random weights",
    ]
    assert main([*args, "schedule.train_steps=3"]) == 0
    resumed = _summary(capsys.readouterr().out)
    assert resumed[-1] == f"start     resume from {run_dir / 'checkpoints' / 'iter_0000002'} at step 2"
    assert resumed[1:-1] == [line.replace("steps     2 = 2.00", "steps     3 = 3.00") for line in fresh[1:-1]]


def _smoke(tmp_path, **env) -> str:
    """A no-store run (one model step, checkpoint saved and reloaded) in a fresh interpreter: its stderr."""
    env = {k: v for k, v in os.environ.items() if k not in (SHOW_ENV, "PYTHONWARNINGS")} | env
    done = subprocess.run([sys.executable, "-m", "megatron_regdpo.train", "--config", RECIPE,
                           f"run.output_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_known_harmless_warnings_hidden_with_one_line(tmp_path):
    err = _smoke(tmp_path / "quiet")
    assert not re.search(r"\w+Warning: ", err), err
    assert not [h.message for h in HARMLESS if re.search(h.message, err)], err
    assert len([line for line in err.splitlines() if "known-harmless" in line]) == 1, err

    loud = _smoke(tmp_path / "loud", **{SHOW_ENV: "1"})
    assert "UserWarning: Transformer Engine and Apex are not installed" in loud  # megatron-core, on CPU
    assert "known-harmless" not in loud

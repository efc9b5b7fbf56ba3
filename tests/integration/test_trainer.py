"""The trainer end to end on a tiny GT-Pair store: exact resume, SIGTERM, non-finite steps, a kill
during a checkpoint save, TensorBoard and W&B logging."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _procs import describe, output_of, wait_for

from megatron_regdpo.parallel.procs import kill_all, kill_tree, stop_tree, wait_gone

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "debug" / "tiny_cpu.yaml")


def _args(store, out, steps, *extra):
    return ["--config", RECIPE, f"data.store={store}", f"run.output_dir={out}", f"schedule.train_steps={steps}",
            "objective.beta=50", "data.global_batch_pairs=1", *extra]


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "tiny-cpu" / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_bitwise_exact(store, tmp_path, capsys):
    from megatron_regdpo.train import main

    capsys.readouterr()
    assert main(_args(store, tmp_path / "once", 6, "checkpoint.interval=3")) == 0
    saved = [line for line in capsys.readouterr().out.splitlines() if line.startswith("saved checkpoint")]
    assert [line.rsplit("/", 1)[-1] for line in saved] == ["iter_0000003", "iter_0000006"]  # a line per save
    assert main(_args(store, tmp_path / "twice", 3, "checkpoint.interval=3")) == 0
    assert main(_args(store, tmp_path / "twice", 6, "checkpoint.interval=3")) == 0   # resumes from step 3
    once, twice = _metrics(tmp_path / "once"), _metrics(tmp_path / "twice")
    assert [m["step"] for m in twice] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(once, twice):
        assert (a["loss/total"], a["optim/grad_norm"], a["dpo/dgr"]) == (b["loss/total"], b["optim/grad_norm"], b["dpo/dgr"])
    ckpts = sorted(p.name for p in (tmp_path / "twice" / "tiny-cpu" / "checkpoints").glob("iter_*"))
    assert ckpts == ["iter_0000003", "iter_0000006"]


def test_non_finite_steps_are_skipped_then_abort(store, tmp_path, monkeypatch):
    from megatron_regdpo.train import main
    from megatron_regdpo.training import trainer

    real = trainer.micro_batches
    poisoned_steps = {1, 3, 4}

    def poisoned(*args, step, **kwargs):
        mbs = real(*args, step=step, **kwargs)
        if step in poisoned_steps:
            for mb in mbs:
                mb["x_t"] = torch.full_like(mb["x_t"], float("nan"))
        return mbs

    monkeypatch.setattr(trainer, "micro_batches", poisoned)
    with pytest.raises(FloatingPointError, match="2 steps in a row"):
        main(_args(store, tmp_path, 10, "optim.max_skipped_steps=2"))
    m = _metrics(tmp_path)
    assert [x["optim/skipped_steps"] for x in m] == [0, 1, 1, 2, 3]   # step index 1 skipped, 3 and 4 abort


@pytest.fixture
def start():
    """Start the trainer CLI; whatever a test leaves running of it (a failed wait, a kill) is ended after
    the test, with everything it started, by pid."""
    procs = []

    def _start(store, out, steps, *extra):
        cmd = [sys.executable, "-m", "megatron_regdpo.train", *_args(store, out, steps, *extra)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        return procs[-1]

    yield _start
    for proc in procs:
        if proc.poll() is None:  # not yet reaped, so the pid is still this trainer's
            kill_tree(proc.pid)
        proc.communicate()


def _wait_for(predicate, proc, timeout=120.0):
    return wait_for(predicate, proc, timeout)



def test_sigterm_saves_at_step_boundary_and_exits_0(store, tmp_path, start):
    proc = start(store, tmp_path, 1000)
    jsonl = tmp_path / "tiny-cpu" / "metrics.jsonl"
    assert _wait_for(lambda: jsonl.exists() and jsonl.read_text().count("\n") >= 2, proc), output_of(proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    last = _metrics(tmp_path)[-1]["step"]
    latest = (tmp_path / "tiny-cpu" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"iter_{last:07d}" and "stop requested" in out


def test_kill_during_save_leaves_previous_checkpoint(store, tmp_path, start):
    from megatron_regdpo.train import main
    from megatron_regdpo.training.checkpoint import Checkpointer

    ckpts = tmp_path / "tiny-cpu" / "checkpoints"
    proc = start(store, tmp_path, 1000, "checkpoint.interval=1", "checkpoint.keep=2")
    partial_after_first = lambda: (ckpts / "latest").exists() and any(ckpts.glob("*.partial"))  # noqa: E731
    assert _wait_for(partial_after_first, proc), output_of(proc)
    started = stop_tree(proc.pid)[1:]   # frozen, so the trainer starts no more: what it started so far
    proc.kill()                         # the trainer only, as an OOM killer would
    proc.wait()
    # what it started (checkpoint writers) dies with it, instead of writing on into a save no one publishes
    survivors = wait_gone(started, timeout=10)
    names = [describe(p) for p in survivors]
    kill_all(survivors)
    assert not names, names
    latest = Checkpointer(ckpts).latest()
    assert latest is not None and (latest / "metadata.json").is_file()
    step = int(latest.name.split("_")[1])
    assert main(_args(store, tmp_path, step + 1, "checkpoint.interval=1")) == 0   # resumes and continues
    assert _metrics(tmp_path)[-1]["step"] == step + 1


def test_recompute_modes_give_identical_steps(store, tmp_path):
    from megatron_regdpo.train import main

    runs = {}
    for mode in ("none", "selective", "full", "full+offload"):  # offload: the layer inputs in host memory
        extra = ["model.recompute=full", "model.offload_activations=true"] if mode == "full+offload" else \
            [f"model.recompute={mode}"]
        assert main(_args(store, tmp_path / mode, 2, *extra)) == 0
        runs[mode] = [(m["loss/total"], m["optim/grad_norm"]) for m in _metrics(tmp_path / mode)]
    assert runs["none"] == runs["selective"] == runs["full"] == runs["full+offload"]


def test_reading_ahead_gives_identical_steps(store, tmp_path, monkeypatch):
    """data.prefetch (the next step's pairs read during this step) on and off: the same steps, bitwise, across
    epoch ends (one pair per step); with it on, every step after the first takes pairs that were read ahead,
    and its checkpoint holds the same sampler position (resumed with it off, step 6 is the straight run's)."""
    from megatron_regdpo.data import prefetch
    from megatron_regdpo.train import main

    read_ahead: list[bool] = []
    real = prefetch.Prefetcher.__getitem__
    monkeypatch.setattr(prefetch.Prefetcher, "__getitem__",
                        lambda self, i: read_ahead.append(i in self._pending) or real(self, i))
    runs, ahead = {}, {}
    for on, steps in (("true", 5), ("false", 6)):
        read_ahead.clear()
        assert main(_args(store, tmp_path / on, steps, f"data.prefetch={on}")) == 0
        runs[on], ahead[on] = _metrics(tmp_path / on), list(read_ahead)
    assert ahead["true"] == [False] + [True] * 4 and ahead["false"] == [False] * 6
    assert main(_args(store, tmp_path / "true", 6, "data.prefetch=false")) == 0   # resumes from the step-5 save
    key = lambda m: (m["step"], m["loss/total"], m["optim/grad_norm"], m["dpo/s"])  # noqa: E731
    assert [key(m) for m in _metrics(tmp_path / "true")] == [key(m) for m in runs["false"]]
    assert all(m["time/data_s"] >= 0.0 for m in runs["true"] + runs["false"])


def test_eval_scores_held_out_pairs(store, tmp_path):
    from megatron_regdpo.train import main

    assert main(_args(store, tmp_path, 4, "eval.interval=2", "eval.holdout_pairs=1")) == 0
    evals = [m for m in _metrics(tmp_path) if "eval/implicit_acc" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert all(0.0 <= m["eval/implicit_acc"] <= 1.0 and m["eval/dpo"] > 0 for m in evals)


def test_damaged_checkpoint_at_resume_is_one_error_line(store, tmp_path, capsys):
    from megatron_regdpo.train import main

    assert main(_args(store, tmp_path, 2, "checkpoint.interval=1")) == 0
    root = tmp_path / "tiny-cpu" / "checkpoints"
    newest = root / (root / "latest").read_text().strip()
    payload = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF   # one flipped byte: loads silently without the checksum manifest
    payload.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(_args(store, tmp_path, 3, "checkpoint.interval=1")) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and payload.name in errors[0] and "iter_0000001" in errors[0], err
    assert not any("Traceback" in line for line in err), err


def test_tensorboard_and_wandb_log_what_the_jsonl_has(store, tmp_path):
    """The trainer CLI with logging.tensorboard and logging.wandb (real packages, W&B offline): both get
    every step's scalars as metrics.jsonl has them, W&B the resolved config; W&B's service ends with it."""
    pytest.importorskip("wandb", reason="the `logging` extra (wandb) is not installed")
    pytest.importorskip("tensorboard", reason="the `logging` extra (tensorboard) is not installed")
    from _wandb_log import history, offline_env, wandb_left, wandb_records
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cmd = [sys.executable, "-m", "megatron_regdpo.train",
           *_args(store, tmp_path, 2, "logging.tensorboard=true", "logging.wandb=true")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **offline_env(tmp_path)}
    env.pop("WANDB_PROJECT", None)
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout
    left = wandb_left()
    assert not left, [describe(p) for p in left]
    jsonl = _metrics(tmp_path)
    run_dir = tmp_path / "tiny-cpu"
    scalars = {k for k, v in jsonl[0].items() if k not in ("step", "time") and isinstance(v, (int, float))}

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert set(events.Tags()["scalars"]) == scalars
    for tag in ("loss/total", "dpo/dgr", "optim/grad_norm"):
        got = events.Scalars(tag)
        assert [e.step for e in got] == [m["step"] for m in jsonl], tag
        assert [e.value for e in got] == pytest.approx([m[tag] for m in jsonl], rel=1e-6), tag  # float32 there

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert run.display_name == "tiny-cpu" and run.project == "megatron_regdpo"
    assert config["objective"]["beta"] == 50 and config["data"]["store"] == str(store)
    rows = history(records)
    assert sorted(rows) == [1, 2]
    for m in jsonl:
        assert {k: rows[m["step"]][k] for k in scalars} == {k: m[k] for k in scalars}

"""The job as a scheduler sees it: launch/torchrun.sh (its launcher, torchrun's own run in-process by
megatron_regdpo.launcher, one CPU worker) signalled as a whole process group while it saves checkpoints; the
launcher SIGKILLed alone; two trainers on one run folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from _procs import describe, output_of, wait_for

from megatron_regdpo.parallel.procs import kill_all, kill_tree, wait_gone

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/debug/tiny_cpu.yaml"
LAUNCHER = "megatron_regdpo.launcher"   # launch/torchrun.sh runs `PYTHON -m megatron_regdpo.launcher`


def _overrides(store, out, steps, *extra):
    return [f"data.store={store}", f"run.output_dir={out}", f"schedule.train_steps={steps}", "objective.beta=50",
            "data.global_batch_pairs=1", *extra]


@pytest.fixture
def launch():
    """Start a job the way a scheduler does: its own session and process group. Whatever a test leaves
    of it is ended afterwards, by pid: the tree under the launcher and the workers found at start."""
    jobs, workers = [], []

    def _launch(*cmd, launcher=True):
        env = {**{k: v for k, v in os.environ.items() if k != "TORCHRUN"}, "PYTHONWARNINGS": "ignore",
               "PYTHON": sys.executable, "NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1"}
        full = ["bash", "launch/torchrun.sh", RECIPE, *cmd] if launcher else \
            [sys.executable, "-m", "megatron_regdpo.train", "--config", RECIPE, *cmd]
        jobs.append(subprocess.Popen(full, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
        return jobs[-1]

    _launch.workers = workers  # tests add the workers they find: re-parented ones are no longer in the tree
    yield _launch
    kill_all(workers)  # first: an orphaned worker keeps the job's output pipe open
    for job in jobs:
        if job.poll() is None:
            kill_tree(job.pid)
        job.communicate()


def _wait_for(predicate, proc, timeout=90.0):
    return wait_for(predicate, proc, timeout)



def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "tiny-cpu" / "metrics.jsonl").read_text().splitlines()]


def _tree(pid) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@pytest.mark.parametrize("target", ["process group", "every process"])
def test_sigterm_to_the_job_while_saving_saves_and_exits_0(store, tmp_path, launch, target):
    ckpts = tmp_path / "tiny-cpu" / "checkpoints"
    job = launch(*_overrides(store, tmp_path, 1000, "checkpoint.interval=1", "checkpoint.keep=2"))
    saving = lambda: (ckpts / "latest").exists() and any(ckpts.glob("*.partial"))  # noqa: E731
    assert _wait_for(saving, job), output_of(job)
    tree = _tree(job.pid)
    launch.workers += tree
    if target == "process group":   # a scheduler's kill -TERM -- -PGID: the launcher script's group
        os.killpg(job.pid, signal.SIGTERM)
    else:                           # SLURM's scancel: every process of the step, the launcher included
        for p in tree:
            p.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 0, out
    last = _metrics(tmp_path)[-1]["step"]
    assert (ckpts / "latest").read_text().strip() == f"iter_{last:07d}", out
    assert not list(ckpts.glob("*.partial")) and "stop requested" in out, out
    left = [describe(p) for p in wait_gone(tree, timeout=10)]
    assert not left, left


def test_sigkill_of_the_launcher_stops_its_workers_and_a_rerun_starts_cleanly(store, tmp_path, launch, capsys):
    from megatron_regdpo.train import main

    job = launch(*_overrides(store, tmp_path, 1000, "checkpoint.interval=2"))
    jsonl = tmp_path / "tiny-cpu" / "metrics.jsonl"
    assert _wait_for(lambda: jsonl.exists() and jsonl.read_text().count("\n") >= 1, job), output_of(job)
    launcher = next(p for p in _tree(job.pid) if LAUNCHER in " ".join(p.cmdline()))
    workers = launcher.children(recursive=True)
    launch.workers += workers
    assert workers
    launcher.kill()
    left = [describe(p) for p in wait_gone(workers, timeout=10)]
    assert not left, left   # before: the worker trained on, beside whatever ran next
    out, _ = job.communicate(timeout=60)
    assert "the launcher (pid" in out and "is gone" in out, out
    step = _metrics(tmp_path)[-1]["step"]
    capsys.readouterr()
    assert main(["--config", str(ROOT / RECIPE), *_overrides(store, tmp_path, step + 1, "checkpoint.interval=2")]) == 0
    assert "taking over the stale lock" in capsys.readouterr().err   # the killed worker held it
    assert not (tmp_path / "tiny-cpu" / "run.lock").exists()


def test_second_trainer_on_a_run_folder_fails_naming_the_holder(store, tmp_path, launch, capsys):
    from megatron_regdpo.train import main

    first = launch(*_overrides(store, tmp_path, 1000), launcher=False)
    jsonl = tmp_path / "tiny-cpu" / "metrics.jsonl"
    assert _wait_for(lambda: jsonl.exists(), first), output_of(first)
    capsys.readouterr()
    assert main(["--config", str(ROOT / RECIPE), *_overrides(store, tmp_path, 2)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: run folder {tmp_path / 'tiny-cpu'} is in use by host "), err
    assert f"pid {first.pid}, started " in err[-1], err
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out

"""What a job prints when it fails (issue 14): through launch/torchrun.sh (megatron_regdpo.launcher, 2 gloo
ranks) a user error is the worker's one line and its exit code, not torchrun's ChildFailedError report; a
crash keeps that report, with the worker's traceback. Tiny worker scripts cover each verdict of the launcher
(said, crashed, unexpected exit, stopped by a signal); a 2-rank data-parallel run warns of a DGR collapse once."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_regdpo.parallel.procs import run_tree
from test_consistency import RECIPE, make_store

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = [sys.executable, "-m", "megatron_regdpo.launcher", "--standalone", "--nproc-per-node=2"]
REPORT = ("ChildFailedError", "Traceback", "failed (exitcode", "Root Cause")
WORKER = """\
import os, signal, sys, time
case = sys.argv[1]
if not case.startswith("foreign"):   # a worker of ours: megatron_regdpo.train calls this first
    from megatron_regdpo.training import lifecycle
    if case == "said late":          # the others wait this long for local rank 0 to say it and end (5 s)
        lifecycle.SPEAKER_WAIT_S = 0.3
    lifecycle.exit_with_launcher()
if case.startswith("said"):          # train.py's user error: the node's first process says it, all exit 1
    first = os.environ["LOCAL_RANK"] == "0"
    if first:                        # slower than the others; "late": torchrun stops it once they ended
        time.sleep(60 if case == "said late" else 1)
        print("error: the one line", file=sys.stderr)
    sys.exit(1)
if case in ("raises", "foreign raises"):
    raise RuntimeError("boom in rank " + os.environ["RANK"])
if case == "foreign exit":           # exit 1, nothing said: unexpected
    sys.exit(1)
if case == "sigterm":                # a stop signal during setup (SIGTERM restored to its default)
    os.kill(os.getpid(), signal.SIGTERM)
if case == "ctrl-c":
    raise KeyboardInterrupt
"""


def _run(cmd, tmp_path, **env) -> tuple[int, str]:
    log = tmp_path / "out.log"
    with open(log, "w") as out:
        rc = run_tree(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=120,
                      env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env})
    return rc, log.read_text()


def _said(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("error:", "invalid config:"))]


def _quiet(out: str) -> None:
    assert not [r for r in REPORT if r in out], out


def _torchrun_sh(tmp_path, *overrides):
    return _run(["bash", "launch/torchrun.sh", RECIPE, *overrides], tmp_path, NPROC_PER_NODE="2",
                PYTHON=sys.executable)


def test_user_error_through_torchrun_sh_is_the_workers_one_line(tmp_path):
    rc, out = _torchrun_sh(tmp_path, f"data.store={tmp_path / 'nowhere'}", "data.global_batch_pairs=2")
    said = _said(out)
    assert rc == 2 and len(said) == 1 and said[0].startswith("invalid config: data.store="), out
    assert "-m megatron_regdpo.launcher --standalone --nproc-per-node=2" in out   # the script's command line
    _quiet(out)


@pytest.mark.parametrize("module", ["megatron_regdpo.train", "tools/make_gt_pairs.py"])
def test_a_usage_error_is_printed_once(tmp_path, module):
    """Every rank parses the same command line: the node's first prints argparse's error, the launcher nothing."""
    target = ["-m", module] if module.startswith("megatron_regdpo") else [module]
    rc, out = _run([*LAUNCHER, *target, "--no-such-flag"], tmp_path)
    assert rc == 2 and out.count("usage:") == 1 and out.count(": error: ") == 1, out
    _quiet(out)


def test_a_crash_in_training_keeps_torchruns_report_with_the_traceback(tmp_path):
    """A learning rate that makes the loss NaN at step 2: FloatingPointError, uncaught (a crash, not a said
    error), on both ranks."""
    store = make_store(tmp_path / "pairs.zarr", [(16, 3, 8, 8)] * 2)
    rc, out = _torchrun_sh(tmp_path, f"data.store={store}", f"run.output_dir={tmp_path}", "data.global_batch_pairs=2",
                           "optim.lr=1e30", "optim.max_skipped_steps=1", "schedule.train_steps=3")
    assert rc == 1 and "ChildFailedError" in out and "Root Cause" in out, out
    report = out[out.index("Root Cause"):]
    assert "FloatingPointError: 1 steps in a row had a non-finite loss" in report, out  # the error file's traceback
    assert "error_file: <N/A>" not in out, out


VERDICTS = [
    ("said", 1, False, "error: the one line"),
    ("said late", 1, False, "error: 1 worker(s) exited with code 1; local rank 0, which says why, was stopped "
                            "before it could: rerun to see the error"),
    ("sigterm", 143, False, "error: 2 worker(s) stopped by SIGTERM before training started (ranks 0, 1): "
                            "nothing to save"),
    ("ctrl-c", 130, False, "error: 2 worker(s) stopped by SIGINT before training started (ranks 0, 1): "
                           "nothing to save"),
    ("raises", 1, "RuntimeError: boom in rank", None),         # the traceback our hook wrote
    ("foreign raises", 1, "error_file: <N/A>", None),           # no error file: torchrun's report as ever
    ("foreign exit", 1, "error_file: <N/A>", None),
]


@pytest.mark.parametrize("case, rc, report, line", VERDICTS, ids=[v[0] for v in VERDICTS])
def test_the_launchers_verdict_per_worker_ending(tmp_path, case, rc, report, line):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    got, out = _run([*LAUNCHER, str(script), case], tmp_path)
    assert got == rc, out
    if report:
        assert "ChildFailedError" in out and report in out[out.index("Failures:"):], out
    else:
        assert _said(out) == [line], out
        _quiet(out)


def test_launcher_keeps_torchruns_options():
    help_text = subprocess.run([sys.executable, "-m", "megatron_regdpo.launcher", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60).stdout
    assert help_text.startswith("usage: python -m megatron_regdpo.launcher")
    assert "--signals-to-handle" in help_text and "--nproc-per-node" in help_text   # launch/torchrun.sh reads it

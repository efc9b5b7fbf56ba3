"""tools/plot_run.py on synthetic runs (a dashboard, missing and malformed files, a killed run's last line),
and the launch/ scripts: syntax, and the exact launcher / srun command lines they build (stub commands)."""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_regdpo.training.metrics import OBJECTIVE_NAMES, MetricsFileError
from megatron_regdpo.training.plot import PANELS, plot_run

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_spec = importlib.util.spec_from_file_location("plot_run_tool", ROOT / "tools" / "plot_run.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def _record(step: int) -> dict:
    """A plausible Reg-DPO step: DGR decays from 125, the gaps open, accuracy rises."""
    decay = math.exp(-step / 40)
    return {"step": step, "time": 1.7e9 + 2 * step, **{k: 0.0 for k in OBJECTIVE_NAMES},
            "loss/total": 0.69 * decay + 0.3, "loss/dpo": 0.69 * decay, "loss/sft": 0.3, "dpo/dgr": 125 * decay,
            "dpo/win_gap": -1e-3 * (1 - decay), "dpo/lose_gap": 2e-3 * (1 - decay),
            "dpo/implicit_acc": 1 - 0.5 * decay, "optim/lr": 5e-6 * min(1.0, step / 10),
            "optim/grad_norm": 1 + 0.1 * math.sin(step), "optim/skipped_steps": 0,
            "throughput/pairs_per_s": 3.2, "throughput/samples_per_s": 6.4, "time/step_s": 5.0,
            "memory/peak_gb": 61.5}


def _write_run(run_dir: Path, records, tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _assert_png(path: Path, min_bytes: int = 20_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes, (path, len(data))


def test_dashboard_from_a_synthetic_run(tmp_path, capsys):
    _write_run(tmp_path / "run", [_record(s) for s in range(1, 121)])
    assert cli.main([str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'run' / 'dashboard.png'}"
    _assert_png(tmp_path / "run" / "dashboard.png")
    assert cli.main([str(tmp_path / "run"), "--out", str(tmp_path / "other" / "d.png"), "--smooth", "10"]) == 0
    _assert_png(tmp_path / "other" / "d.png")
    assert len(PANELS) == 8


def test_missing_metrics_give_no_data_panels_not_errors(tmp_path):
    _write_run(tmp_path, [{"step": 1, "loss/total": 0.7}, {"step": 2, "loss/total": float("nan")}])
    _assert_png(plot_run(tmp_path), min_bytes=5_000)
    _write_run(tmp_path, [])  # a run that has not logged its first step yet
    _assert_png(plot_run(tmp_path), min_bytes=5_000)


def test_missing_file_names_it(tmp_path, capsys):
    assert cli.main([str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "metrics.jsonl") in err and "no such file" in err


def test_malformed_line_is_an_error_with_its_line_number(tmp_path, capsys):
    path = _write_run(tmp_path, [_record(1), _record(2)], tail="not json\n" + json.dumps(_record(4)) + "\n")
    with pytest.raises(MetricsFileError, match=rf"{path}:3: malformed"):
        plot_run(tmp_path)
    _write_run(tmp_path, [_record(1), [1, 2], _record(3)])
    assert cli.main([str(tmp_path)]) == 1
    assert f"{path}:2: malformed" in capsys.readouterr().err
    # even as the last line: with its newline, it was written whole, so it is not a killed run's fragment
    _write_run(tmp_path, [_record(1)], tail='{"step": 2, "loss\n')
    with pytest.raises(MetricsFileError, match=":2: malformed"):
        plot_run(tmp_path)


def test_truncated_last_line_of_a_killed_run_is_skipped(tmp_path, caplog):
    _write_run(tmp_path, [_record(s) for s in range(1, 31)], tail=json.dumps(_record(31))[:57])
    with caplog.at_level(logging.WARNING):
        _assert_png(plot_run(tmp_path))
    assert "metrics.jsonl:31: skipping a truncated last line" in caplog.text


# ------------------------------------------------------------------------------------------ launch/
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
SBATCH = ROOT / "launch" / "slurm_train.sbatch"
RECIPE = "recipes/wan14b/regdpo_t2v_h100x64.yaml"
LAUNCHER = ["python", "-m", "megatron_regdpo.launcher"]   # as the stub logs it: torch's launcher, in-process


@pytest.mark.parametrize("script", [TORCHRUN_SH, SBATCH], ids=lambda p: p.name)
def test_launch_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_dry_runs_the_recipe_before_launching():
    text = SBATCH.read_text()
    dry = [line for line in text.splitlines() if "--dry-run" in line and not line.lstrip().startswith("#")]
    assert len(dry) == 1 and "-m megatron_regdpo.train" in dry[0] and '--world-size "$WORLD"' in dry[0]
    assert text.index("--dry-run") < text.index("\nsrun ")
    for directive in ("--nodes=", "--gpus-per-node=", "--time=", "--output="):
        assert f"#SBATCH {directive}" in text


def _stub(bin_dir: Path, name: str) -> None:
    """A command that prints its name and arguments, one per line (srun also runs what it was given)."""
    body = 'printf "%s\\n" "$(basename "$0")" "$@" >> "$STUB_LOG"\n'
    if name == "torchrun":  # the launcher reads `torchrun --help` for its options: answer it, log only launches
        body = '[[ $1 == --help ]] && exit 0\n' + body
    if name == "python":  # torchrun.sh asks python whether it has torch (-c) and the launcher's --help: log neither
        body = '[[ $1 == -c || $3 == --help ]] && exit 0\n' + body
    if name == "srun":  # one node's task: skip srun's own options, run the command with SLURM_NODEID=0
        body += 'while [[ $1 == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n'
    if name == "scontrol":
        body = 'printf "gpu-node-%s\\n" 01 02\n'
    (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
    (bin_dir / name).chmod(0o755)


def _run_with_stubs(tmp_path, cmd, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("torchrun", "srun", "scontrol", "python", "nvidia-smi"):
        _stub(bin_dir, name)
    log = tmp_path / "calls.log"
    log.write_text("")
    launch_vars = ("SLURM_", "NNODES", "NODE_RANK", "MASTER_", "NPROC_", "RDZV_", "TORCHRUN")
    base = {k: v for k, v in os.environ.items() if not k.startswith(launch_vars) and k not in ("PYTHON", "VENV")}
    full_env = base | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log)} | env
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return log.read_text().splitlines(), proc


def test_torchrun_single_node_command(tmp_path):
    lines, _ = _run_with_stubs(tmp_path, ["bash", str(TORCHRUN_SH), RECIPE, "optim.lr=1e-5"], NPROC_PER_NODE="4")
    assert lines == [*LAUNCHER, "--standalone", "--nproc-per-node=4", "-m", "megatron_regdpo.train",
                     "--config", RECIPE, "optim.lr=1e-5"]
    lines, _ = _run_with_stubs(tmp_path, ["bash", str(TORCHRUN_SH), RECIPE], NPROC_PER_NODE="4", TORCHRUN="torchrun")
    assert lines[:3] == ["torchrun", "--standalone", "--nproc-per-node=4"]   # TORCHRUN: torch's own binary


def test_torchrun_multi_node_command(tmp_path):
    env = dict(NPROC_PER_NODE="8", NNODES="8", NODE_RANK="3", MASTER_ADDR="node0", MASTER_PORT="29555",
               RDZV_ID="job7")
    lines, _ = _run_with_stubs(tmp_path, ["bash", str(TORCHRUN_SH), RECIPE], **env)
    assert lines == [*LAUNCHER, "--nnodes=8", "--nproc-per-node=8", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=node0:29555", "--rdzv-id=job7", "--rdzv-conf=is_host=0",
                     "-m", "megatron_regdpo.train", "--config", RECIPE]
    bin_dir = tmp_path / "bin"
    proc = subprocess.run(["bash", str(TORCHRUN_SH), RECIPE], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "NNODES": "2",
                                            "STUB_LOG": str(tmp_path / "x.log")} | {"MASTER_ADDR": ""})
    assert proc.returncode != 0 and "needs MASTER_ADDR" in proc.stderr
    proc = subprocess.run(["bash", str(TORCHRUN_SH), "recipes/nope.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "recipe not found: recipes/nope.yaml" in proc.stderr


def test_sbatch_dry_run_then_one_torchrun_per_node(tmp_path):
    env = dict(SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8",
               SLURM_JOB_NODELIST="gpu-node-[01-02]", SLURM_CPUS_PER_TASK="64")
    lines, proc = _run_with_stubs(tmp_path, ["bash", str(SBATCH), RECIPE, "optim.lr=1e-5"], **env)
    split = lines.index("srun")
    assert lines[:split] == ["python", "-m", "megatron_regdpo.train", "--config", RECIPE, "--dry-run",
                             "--world-size", "16", "optim.lr=1e-5"]
    launch = lines.index("python", split)
    srun, torchrun = lines[split:launch], lines[launch:]
    assert "--cpus-per-task=64" in srun and "--nodes=2" in srun
    assert torchrun == [*LAUNCHER, "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=gpu-node-01:29500", "--rdzv-id=4242", "--rdzv-conf=is_host=1",
                        "-m", "megatron_regdpo.train", "--config", RECIPE, "optim.lr=1e-5"]
    assert "2 nodes x 8 GPUs = 16 ranks, rendezvous gpu-node-01:29500" in proc.stdout


def test_torchrun_falls_back_to_the_projects_venv(tmp_path):
    """Outside any environment (no python with torch on PATH) the script uses the project's .venv/bin/python,
    and without one it says what to do (it used to fail with exit 127)."""
    fake = tmp_path / "project"
    (fake / "launch").mkdir(parents=True)
    shutil.copy(TORCHRUN_SH, fake / "launch" / "torchrun.sh")
    (fake / "recipe.yaml").write_text("{}\n")
    env = {"PATH": "/usr/bin:/bin", "STUB_LOG": str(tmp_path / "calls.log"), "NPROC_PER_NODE": "1",
           "HOME": os.environ.get("HOME", "/tmp")}
    proc = subprocess.run(["bash", "launch/torchrun.sh", "recipe.yaml"], cwd=fake, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "no python with torch found" in proc.stderr and "make install" in proc.stderr
    (fake / ".venv" / "bin").mkdir(parents=True)
    _stub(fake / ".venv" / "bin", "python")
    proc = subprocess.run(["bash", "launch/torchrun.sh", "recipe.yaml"], cwd=fake, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "calls.log").read_text().splitlines()[:5] == [*LAUNCHER, "--standalone", "--nproc-per-node=1"]

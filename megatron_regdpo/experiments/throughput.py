"""Throughput sweeps: one short real training run (torchrun) per point of a cartesian grid of overrides.

    points = expand_sweep(["parallel.cp=1,2", "parallel.tp=1,2"], base_cfg)   # [("parallel.cp=1", ...), ...]
    record = run_point(recipe, points[0], sets=[...], world_size=4, steps=6, warmup=2, workdir=tmp)
    print(summarize(records)); write_plot(records, "bench.png")

A point is validated first (load_config + validate against the world size) and recorded as
"invalid: <reason>" without running. A run's RUN_DIR/metrics.jsonl gives the medians over the steps after
the warmup. The config hash is sha256 of the resolved YAML (recipe + --set + the point + train_steps; the
scratch paths left out), first 12 hex, so equal settings hash alike across machines and days.
On CPU the ranks are gloo processes on one host: compare points by ratio only, never as absolute figures.
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from megatron_regdpo.config import Config, ConfigError, dump_yaml, load_config, validate

MEDIANS = {"step_s": "time/step_s", "data_s": "time/data_s", "pairs_per_s": "throughput/pairs_per_s",
           "model_tflops": "throughput/model_tflops", "hardware_tflops": "throughput/hardware_tflops",
           "peak_gb": "memory/peak_gb"}
LOG_TAIL_LINES = 15


def _has_key(cfg: Config, key: str) -> bool:
    node = cfg.to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, dict)


def expand_sweep(sweeps: list[str], cfg: Config | None = None) -> list[tuple[str, ...]]:
    """["a.b=1,2", "c.d=x,y"] -> [("a.b=1", "c.d=x"), ("a.b=1", "c.d=y"), ("a.b=2", "c.d=x"), ...].
    With `cfg`, every key must be one of its (leaf) keys. No sweeps: one point with no overrides."""
    axes, seen = [], set()
    for spec in sweeps:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--sweep {spec!r}: expected KEY=V1,V2,... (e.g. parallel.cp=1,2)")
        if cfg is not None and not _has_key(cfg, key):
            raise ValueError(f"--sweep {spec!r}: unknown config key {key!r}")
        if key in seen:
            raise ValueError(f"--sweep {spec!r}: key {key!r} is swept twice")
        items = [v.strip() for v in values.split(",")]
        if not all(items):
            raise ValueError(f"--sweep {spec!r}: empty value in {values!r}")
        seen.add(key)
        axes.append([f"{key}={v}" for v in items])
    return list(itertools.product(*axes))


def point_overrides(point: tuple[str, ...], *, sets: list[str], steps: int, scratch: Path | None = None) -> list[str]:
    """The train overrides for one point: --set values, the point, the schedule; with `scratch`, also the
    run and checkpoint folders inside it (checkpoint.interval=0 still writes one at the end)."""
    out = [*sets, *point, f"schedule.train_steps={steps}", "checkpoint.interval=0"]
    if scratch is not None:
        out += [f"run.output_dir={scratch}", "run.name=bench", f"checkpoint.dir={scratch / 'checkpoints'}"]
    return out


def machine() -> dict:
    import torch

    info = {"node": platform.node(), "cpus": os.cpu_count(), "device": "cpu (gloo ranks: ratios only)"}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def _medians(records: list[dict], warmup: int) -> dict:
    kept = [r for r in records if r["step"] > warmup] or records[-1:]
    out = {}
    for name, key in MEDIANS.items():
        values = [r[key] for r in kept if isinstance(r.get(key), (int, float))]
        out[name] = statistics.median(values) if values else None
    out["steps_measured"] = len(kept)
    return out


def run_point(recipe: str | Path, point: tuple[str, ...], *, sets: list[str], world_size: int, steps: int,
              warmup: int, workdir: Path, peak_tflops: float | None = None, timeout: float | None = None) -> dict:
    """Validate, run and measure one point; returns its JSON record (never raises for a bad point)."""
    from megatron_regdpo.models.wan.arch import resolve_arch
    from megatron_regdpo.parallel.procs import run_tree
    from megatron_regdpo.training.metrics import METRICS_FILE, read_metrics

    record = {"overrides": list(point), "sets": list(sets), "world_size": world_size, "steps": steps,
              "warmup": warmup, "machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "config_hash": None, **dict.fromkeys(MEDIANS), "mfu": None,
              "mfu_note": None if peak_tflops else "no --peak-tflops given"}
    try:
        cfg = load_config(recipe, point_overrides(point, sets=sets, steps=steps))
        record["config_hash"] = hashlib.sha256(dump_yaml(cfg).encode()).hexdigest()[:12]
        validate(cfg, world_size, resolve_arch(cfg.model))
    except (ConfigError, ValueError, KeyError) as e:
        return {**record, "status": f"invalid: {' '.join(str(e).split())}"}
    scratch = Path(workdir) / ("_".join(point).replace("/", "-") or "base")
    scratch.mkdir(parents=True, exist_ok=True)
    # One rank runs without torchrun: under torchrun (TORCHELASTIC_USE_AGENT_STORE=True) the private
    # single-process rendezvous of parallel.groups.init_distributed waits forever for a store it never starts.
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}"] if world_size > 1 else []
    cmd = [sys.executable, *launcher, "-m", "megatron_regdpo.train", "--config", str(recipe),
           *point_overrides(point, sets=sets, steps=steps, scratch=scratch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log_path = scratch / "train.log"
    with open(log_path, "w") as log:
        try:  # on a timeout, torchrun and its ranks end (run_tree)
            rc = run_tree(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout} s"
    try:
        metrics = read_metrics(scratch / "bench" / METRICS_FILE) if rc == 0 else []
    except (OSError, ValueError) as e:
        rc = f"no metrics ({e})"
    if rc != 0 or not metrics:
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return {**record, "status": f"failed (rc {rc or 'ok, no steps'}): " + "\n".join(tail)}
    record.update(_medians(metrics, warmup))
    if peak_tflops and record["model_tflops"] is not None:
        record["mfu"] = record["model_tflops"] / peak_tflops
    return {**record, "status": "ok"}


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def summarize(records: list[dict]) -> str:
    """A markdown table, one row per point."""
    lines = ["| point | status | step s | data s | pairs/s | model TFLOP/s | hw TFLOP/s | MFU | peak GiB | hash |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        status = r["status"].splitlines()[0][:60].replace("|", "/")
        lines.append(f"| {' '.join(r['overrides']) or '(base)'} | {status} | {_fmt(r['step_s'])} | "
                     f"{_fmt(r.get('data_s'))} | {_fmt(r['pairs_per_s'])} | {_fmt(r['model_tflops'])} | "
                     f"{_fmt(r['hardware_tflops'])} | {_fmt(r['mfu'])} | {_fmt(r['peak_gb'])} | "
                     f"{r['config_hash'] or '-'} |")
    return "\n".join(lines)


def write_plot(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Bars of step time and pairs/s per point (Agg canvas, no pyplot); points that did not run show empty."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = ["\n".join(r["overrides"]) or "(base)" for r in records]
    fig = Figure(figsize=(max(6.0, 2.2 * len(records)), 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, name, unit in zip(fig.subplots(2, 1, sharex=True), ("step_s", "pairs_per_s"), ("s", "pairs/s")):
        ax.bar(range(len(records)), [r[name] or 0.0 for r in records], color="tab:blue" if unit == "s" else "tab:green")
        ax.set_ylabel(f"{name} ({unit}, median)")
        ax.set_xticks(range(len(records)), labels, fontsize=8)
    fig.suptitle(title or "throughput sweep")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

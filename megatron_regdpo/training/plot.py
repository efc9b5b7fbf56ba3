"""A one-page PNG dashboard of a run from its metrics.jsonl (tools/plot_run.py is the command line).

Panels: loss (total, dpo, sft), DGR (with the DGRAlarm threshold), win/lose gaps, implicit accuracy,
learning rate, grad norm, throughput, memory. A panel whose metrics are absent says "no data". Noisy curves
can be smoothed (a trailing moving average drawn over the faint raw curve).

Uses matplotlib's object API with the Agg canvas: no pyplot, no global backend switch, no display needed.
"""
from __future__ import annotations

import math
from pathlib import Path

from megatron_regdpo.training.metrics import METRICS_FILE, DGRAlarm, read_metrics

# (title, metric names, y-axis label)
PANELS = (
    ("loss", ("loss/total", "loss/dpo", "loss/sft"), ""),
    ("DPO gradient ratio (DGR)", ("dpo/dgr",), ""),
    ("win / lose gap (policy - reference error)", ("dpo/win_gap", "dpo/lose_gap"), ""),
    ("implicit accuracy", ("dpo/implicit_acc",), "share of pairs with s < 0"),
    ("learning rate", ("optim/lr",), ""),
    ("grad norm (before clipping)", ("optim/grad_norm",), ""),
    ("throughput", ("throughput/pairs_per_s",), "pairs / s"),
    ("peak memory", ("memory/peak_gb",), "GiB"),
)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def _moving_average(values: list[float], n: int) -> list[float]:
    out, window = [], []
    for v in values:
        window.append(v)
        if len(window) > n:
            window.pop(0)
        finite = [x for x in window if math.isfinite(x)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def _draw_panel(ax, records, title, keys, ylabel, smooth: int) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    drawn = False
    for key in keys:
        steps, values = _series(records, key)
        if not steps:
            continue
        if smooth > 1:
            (line,) = ax.plot(steps, values, alpha=0.3, linewidth=0.8)
            ax.plot(steps, _moving_average(values, smooth), color=line.get_color(), label=key)
        else:
            ax.plot(steps, values, label=key)
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.text(0.5, 0.38, ", ".join(keys), ha="center", va="center", transform=ax.transAxes, color="gray",
                fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    if keys[0] == "dpo/dgr":
        steps, values = _series(records, "dpo/dgr")
        alarm = DGRAlarm(values[0]) if values[0] > 0 else None
        if alarm is not None:
            ax.axhline(alarm.threshold, color="red", linestyle="--", linewidth=0.8,
                       label=f"alarm ({alarm.threshold:.3g} = 5% of the first value)")
    if "dpo/win_gap" in keys:
        ax.axhline(0.0, color="black", linewidth=0.6)
    if keys[0] == "dpo/implicit_acc":
        ax.set_ylim(-0.05, 1.05)
    if keys[0] == "optim/lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _headline(run_dir: Path, records: list[dict]) -> str:
    if not records:
        return f"{run_dir.name}: no steps logged"
    last = records[-1]
    parts = [f"{run_dir.name}: step {last['step']}"]
    for label, key, fmt in (("loss", "loss/total", "{:.4f}"), ("DGR", "dpo/dgr", "{:.3g}"),
                            ("acc", "dpo/implicit_acc", "{:.2f}")):
        if isinstance(last.get(key), (int, float)):
            parts.append(f"{label} {fmt.format(last[key])}")
    return ", ".join(parts)


def plot_run(run_dir, out=None, smooth: int = 1) -> Path:
    """Write the dashboard of RUN_DIR/metrics.jsonl to `out` (default RUN_DIR/dashboard.png); return its path.
    Raises FileNotFoundError / metrics.MetricsFileError naming the file (and the line) when it is unreadable."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if smooth < 1:
        raise ValueError(f"smooth must be >= 1 (1 = raw curves), got {smooth}")
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    out = Path(out) if out is not None else run_dir / "dashboard.png"
    cols = 4
    rows = math.ceil(len(PANELS) / cols)
    fig = Figure(figsize=(5 * cols, 3.8 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (title, keys, ylabel) in zip(axes, PANELS):
        _draw_panel(ax, records, title, keys, ylabel, smooth)
    for ax in axes[len(PANELS):]:
        ax.set_visible(False)
    fig.suptitle(_headline(run_dir, records))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out

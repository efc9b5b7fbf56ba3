"""One metrics dict per optimizer step, with stable names, and where it goes: JSONL, console, progress bar,
optional TensorBoard / W&B. Also: averaging over micro-batches and data-parallel ranks, the DGR alarm.

Names (stable: tools/plot_run.py, dashboards and alerts depend on them; see STEP_NAMES):
  loss/        total, dpo, sft                         from objectives.reg_dpo.reg_dpo_metrics
  dpo/         s, dgr, r, win_gap, lose_gap, implicit_acc, reward_margin,
               err_pol_w, err_pol_l, err_ref_w, err_ref_l  (the objective's bare err_* names, namespaced)
  optim/       lr, grad_norm, skipped_steps
  throughput/  pairs_per_s, samples_per_s              whole job; one pair = two samples (winner, loser)
  time/        step_s, data_s (building the step's micro-batches); eval_videos_s (at validation-video steps)
  eval/        implicit_acc, dpo, reward_margin          held-out pairs (trainer.evaluate), at eval.interval
               videos (a list of files), fm_err_policy, fm_err_reference (+ /sigma_S), clip_policy,
               clip_reference, clip_real                 validation videos (eval_hook.py); videos also go to
                                                          TensorBoard (middle frame) and W&B (the mp4)
  memory/      peak_gb                                 GiB (2**30 bytes), this rank
  step         optimizer steps done; the JSONL record adds "time" (Unix seconds when it was logged)

Per step, the trainer does:
  per micro-batch   m_i = objective_metrics(reg_dpo_metrics(out))
  this rank         m = average_microbatches([m_1, ...], num_pairs=[p_1, ...])
  data parallel     m = reduce_over_group(m, dp_group, num_pairs=sum(p_i))   (CP ranks hold equal values)
  the step          m = step_metrics(m, step=..., lr=..., ...); logger.log(m); alarm.update(m["dpo/dgr"], step)
With pipeline parallelism the loss lives on the last stage: give the logger writer_rank = a rank there.

Where the dict goes (JSONL, console, progress bar, TensorBoard, W&B) is metrics_log.py's MetricsLogger.
torch is imported only where needed, so that reading and plotting metrics (tools/plot_run.py) stays fast.
"""
from __future__ import annotations

import json
import logging
import math
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PREFIXES = ("loss/", "dpo/", "optim/", "throughput/", "memory/", "time/")
EVAL_PREFIX = "eval/"  # held-out evaluation (trainer.evaluate) joins the line of the steps it runs at
VIDEOS_KEY = "eval/videos"  # validation videos (training/eval_hook.py): their files, relative to the run folder
_BARE_OBJECTIVE_NAMES = ("err_pol_w", "err_pol_l", "err_ref_w", "err_ref_l")  # reg_dpo_metrics leaves these bare
OBJECTIVE_NAMES = (
    "loss/total", "loss/dpo", "loss/sft",
    "dpo/s", "dpo/dgr", "dpo/r", "dpo/win_gap", "dpo/lose_gap", "dpo/implicit_acc", "dpo/reward_margin",
    *(f"dpo/{k}" for k in _BARE_OBJECTIVE_NAMES),
)
TRAINER_NAMES = (
    "optim/lr", "optim/grad_norm", "optim/skipped_steps",
    "throughput/pairs_per_s", "throughput/samples_per_s", "time/step_s", "memory/peak_gb",
)
STEP_NAMES = ("step", *OBJECTIVE_NAMES, *TRAINER_NAMES)
METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------------------------- the dict
def objective_metrics(raw: Mapping[str, float]) -> dict[str, float]:
    """The objective's metrics under the step dict's names: err_* -> dpo/err_*. Idempotent."""
    out = {}
    for key, value in raw.items():
        if key in _BARE_OBJECTIVE_NAMES:
            key = f"dpo/{key}"
        elif not key.startswith(PREFIXES):
            raise ValueError(f"objective metric {key!r} has none of the prefixes {PREFIXES}: name it "
                             f"there (or in metrics._BARE_OBJECTIVE_NAMES) so that its name is stable")
        out[key] = float(value)
    return out


def step_metrics(objective: Mapping[str, float], *, step: int, lr: float, grad_norm: float,
                 skipped_steps: int, pairs: int, step_s: float, peak_gb: float) -> dict[str, float]:
    """The full step dict. `objective`: the step's objective metrics (micro-batch and DP averaged);
    `pairs`: pairs in this optimizer step over ALL data-parallel ranks; `skipped_steps`: so far (e.g. by
    a non-finite gradient). Tensors are accepted for the numbers (one host sync each)."""
    rate = (lambda n: n / step_s) if step_s > 0 else (lambda n: 0.0)
    return {
        "step": int(step),
        **objective_metrics(objective),
        "optim/lr": float(lr),
        "optim/grad_norm": float(grad_norm),
        "optim/skipped_steps": int(skipped_steps),
        "throughput/pairs_per_s": rate(pairs),
        "throughput/samples_per_s": rate(2 * pairs),
        "time/step_s": float(step_s),
        "memory/peak_gb": float(peak_gb),
    }


def peak_memory_gb(device: torch.device | str | None = None) -> float:
    """GPU: torch.cuda.max_memory_allocated (since start or the last reset_peak_memory_stats), GiB.
    CPU: the process's resident set size NOW (psutil has no peak), GiB. device None: CUDA if available."""
    import torch

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


# ------------------------------------------------------------------------------------------ reductions
def average_microbatches(per_microbatch: Sequence[Mapping[str, float]],
                         num_pairs: Sequence[int] | None = None) -> dict[str, float]:
    """Mean of per-micro-batch metric dicts, weighted by their pairs (each dict is a mean over its pairs),
    so a short last micro-batch counts for what it holds. num_pairs None: equal weights."""
    if not per_microbatch:
        raise ValueError("no micro-batch metrics to average")
    weights = [1] * len(per_microbatch) if num_pairs is None else list(num_pairs)
    if len(weights) != len(per_microbatch):
        raise ValueError(f"{len(per_microbatch)} metric dicts but {len(weights)} pair counts")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"pair counts must be >= 0 with a positive sum, got {weights}")
    keys = list(per_microbatch[0])
    for i, m in enumerate(per_microbatch[1:], 1):
        if set(m) != set(keys):
            raise ValueError(f"micro-batch {i} has other metric names than micro-batch 0: "
                             f"{sorted(set(m) ^ set(keys))}")
    total = sum(weights)
    return {k: sum(w * float(m[k]) for w, m in zip(weights, per_microbatch)) / total for k in keys}


def reduce_over_group(metrics: Mapping[str, float], group, num_pairs: float | None = None) -> dict[str, float]:
    """Average a metrics dict over a (data-parallel) process group: one all_reduce of a packed float64 tensor.

    num_pairs: this rank's pairs, to weight the mean (ranks with a short last batch); None: equal weights.
    A no-op for group None or of size 1. Every rank of `group` must call it with the same names; a checksum
    of the names rides along in the same tensor, so a mismatch raises instead of averaging unlike things.
    """
    import torch
    import torch.distributed as dist

    if group is None or dist.get_world_size(group) == 1:
        return {k: float(v) for k, v in metrics.items()}
    keys = sorted(metrics)
    w = 1.0 if num_pairs is None else float(num_pairs)
    checksum = float(zlib.crc32("\n".join(keys).encode()))  # < 2**32: exact in float64 times any world size
    device = (torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend(group))
              else torch.device("cpu"))
    packed = torch.tensor([float(metrics[k]) * w for k in keys] + [w, checksum], dtype=torch.float64,
                          device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    values = packed.tolist()
    n = dist.get_world_size(group)
    if values[-1] != n * checksum:
        raise RuntimeError(f"ranks of the group disagree on the metric names (this rank: {keys})")
    if values[-2] <= 0:
        raise ValueError(f"the group holds {values[-2]} pairs in all: nothing to average")
    return {k: v / values[-2] for k, v in zip(keys, values[:-2])}


# --------------------------------------------------------------------------------------------- reading
class MetricsFileError(ValueError):
    """metrics.jsonl has a line that is not a JSON object with a "step" (the message names file and line)."""


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl, one per step, sorted by step.

    A resumed run re-logs the steps after its checkpoint: the LAST record of a step wins. A malformed line
    raises MetricsFileError with its line number, except a last line without its newline (a run killed
    mid-write), which is skipped with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a run writes it to RUN_DIR/{METRICS_FILE} when "
                                f"logging.jsonl=true)")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    by_step: dict[int, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError('not a JSON object with an integer "step"')
        except ValueError as e:
            if number == len(lines):  # the final piece has no newline after it: an interrupted write
                log.warning("%s:%d: skipping a truncated last line (interrupted run?)", path, number)
                continue
            raise MetricsFileError(f"{path}:{number}: malformed metrics line ({e}): {line[:80]!r}") from e
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


# ----------------------------------------------------------------------------------------------- alarm
class DGRAlarm:
    """Warns when DGR collapses: the paper's early sign of DPO collapse (the model collapses later).

    DGR = beta_eff * sigmoid(beta_eff * s) starts at beta_eff / 2 (125 at beta 500, diffusion_dpo) and falls
    towards 0 as |s| grows on the wrong side. update() returns True (and logs a warning) when the moving
    average over the last `window` steps falls below fraction * initial_dgr; once per crossing: it re-arms
    when the average is back at or above rearm_fraction * initial_dgr (default 2 * fraction, so that an
    average hovering at the threshold does not warn every step). Nothing is checked before `window` values.
    """

    def __init__(self, initial_dgr: float, fraction: float = 0.05, window: int = 20,
                 rearm_fraction: float | None = None):
        rearm_fraction = 2 * fraction if rearm_fraction is None else rearm_fraction
        if not initial_dgr > 0:
            raise ValueError(f"initial_dgr must be > 0, got {initial_dgr}")
        if not 0 < fraction < 1 or not fraction <= rearm_fraction:
            raise ValueError(f"need 0 < fraction < 1 and fraction <= rearm_fraction, got {fraction}, "
                             f"{rearm_fraction}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.initial_dgr, self.window = float(initial_dgr), window
        self.threshold, self.rearm_threshold = fraction * initial_dgr, rearm_fraction * initial_dgr
        self.armed, self.alarms = True, 0
        self._values: deque[float] = deque(maxlen=window)

    @classmethod
    def from_beta_eff(cls, beta_eff: float, **kwargs) -> DGRAlarm:
        """initial_dgr = beta_eff / 2: the DGR when the policy equals the reference (s = 0)."""
        return cls(beta_eff / 2, **kwargs)

    @property
    def moving_average(self) -> float:
        return sum(self._values) / len(self._values) if self._values else math.nan

    def update(self, dgr: float, step: int | None = None) -> bool:
        self._values.append(float(dgr))
        if len(self._values) < self.window:
            return False
        avg = self.moving_average
        if self.armed and avg < self.threshold:
            self.armed, self.alarms = False, self.alarms + 1
            at = f" at step {step}" if step is not None else ""
            log.warning("DGR collapse alarm%s: the mean DGR of the last %d steps is %.4g, below %.4g (%.3g%% of "
                        "its initial %.4g). The paper sees this before the collapse of vanilla DPO (grid or "
                        "mosaic artifacts): check samples from the latest checkpoint; an SFT term "
                        "(objective.sft_mode) counters it.", at, self.window, avg, self.threshold,
                        100 * self.threshold / self.initial_dgr, self.initial_dgr)
            return True
        if not self.armed and avg >= self.rearm_threshold:
            self.armed = True
            log.info("DGR recovered to %.4g (mean of the last %d steps): alarm re-armed", avg, self.window)
        return False

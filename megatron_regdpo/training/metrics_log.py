"""Where each step's metrics dict goes (training/metrics.py has the names and the reductions): RUN_DIR/metrics.jsonl,
the console summary line, a progress bar, optional TensorBoard / W&B (validation videos included)."""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .metrics import METRICS_FILE, VIDEOS_KEY

log = logging.getLogger(__name__)
WANDB_RUN_ID_FILE = "wandb_run_id"  # in RUN_DIR: the W&B run a resumed run continues

_OPTIONAL = {  # config key -> (module to import, package to install)
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}


def _import_optional(key: str):
    module, package = _OPTIONAL[key]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"logging.{key}=true needs the '{package}' package, which is not installed "
                          f"({e}): install it (pip install {package}) or set logging.{key}=false") from e


def _drop_partial_last_line(path: Path) -> None:
    """A killed run can leave half a line; cut it so that lines appended after a resume stay parseable."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run", path,
                    len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)


def _drop_rows_after(path: Path, step: int) -> None:
    """Rows of steps after `step` (the checkpoint a run resumes from) were logged by a run that died before
    saving them; the resumed run computes those steps again, so the old rows go (one row per step)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) == len(lines):
        return
    log.warning("%s: dropping %d rows after step %d, which the resumed run computes again", path,
                len(lines) - len(keep), step)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a kill here leaves either file whole


_SUMMARY = (("loss", "loss/total", "{:.4f}"), ("dgr", "dpo/dgr", "{:.2f}"), ("acc", "dpo/implicit_acc", "{:.2f}"),
            ("lr", "optim/lr", "{:.2e}"), ("gnorm", "optim/grad_norm", "{:.3g}"))


def format_summary(metrics: Mapping[str, float], total_steps: int | None = None) -> str:
    """`step 120/6000 | loss 0.6931 | dgr 124.95 | acc 0.50 | lr 5.00e-06 | gnorm 1.23 | 2.31 s/step`."""
    parts = [f"step {metrics['step']}" + (f"/{total_steps}" if total_steps else "")]
    parts += [f"{label} {fmt.format(metrics[key])}" for label, key, fmt in _SUMMARY if key in metrics]
    if "time/step_s" in metrics:
        parts.append(f"{metrics['time/step_s']:.2f} s/step")
    return " | ".join(parts)


def _plain(value):
    return value.item() if hasattr(value, "item") else value  # 0-d tensors, numpy scalars


class MetricsLogger:
    """Writes each step's dict on one rank (writer_rank, default 0); the other ranks only check the config.

    RUN_DIR/metrics.jsonl (logging.jsonl): one JSON object per line, appended and flushed per step so that a
    killed run keeps every finished line (a resumed run appends; readers keep the last record of a step).
    RUN_DIR/tensorboard/ (logging.tensorboard; a rerun purges the events of the steps after its checkpoint, or
    all of them from step 0, as in the JSONL) and a W&B run (logging.wandb; project from $WANDB_PROJECT, default
    "megatron_regdpo"; a run resumed from a checkpoint continues the W&B run of its folder, whose id is in
    RUN_DIR/wandb_run_id, unless W&B's own $WANDB_RUN_ID names another) are optional; a missing package fails
    on EVERY rank, before any step, so no rank waits on one that died.
    Console: format_summary every logging.interval steps; a tqdm bar when `progress` (default: stderr is a
    TTY). Use as a context manager, or call close().
    """

    def __init__(self, run_dir, logging_cfg, rank: int, world: int, *, total_steps: int | None = None,
                 start_step: int = 0, progress: bool | None = None, run_name: str | None = None,
                 config: Mapping | None = None, writer_rank: int = 0, stream=None):
        if logging_cfg.interval < 1:
            raise ValueError(f"logging.interval must be >= 1, got {logging_cfg.interval}")
        self.cfg, self.rank, self.world, self.total_steps = logging_cfg, rank, world, total_steps
        self.run_dir, self.stream = Path(run_dir), stream
        self.active = rank == writer_rank
        modules = {k: _import_optional(k) for k in _OPTIONAL if getattr(logging_cfg, k)}  # every rank
        self._file = self._tb = self._wandb = self._bar = None
        self.path = self.run_dir / METRICS_FILE if logging_cfg.jsonl else None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.path is not None:
            _drop_partial_last_line(self.path)
            _drop_rows_after(self.path, start_step)
            self._file = open(self.path, "a", encoding="utf-8")
        if "tensorboard" in modules:   # a rerun (resumed or from step 0): TensorBoard drops the old events of
            # the steps it computes again, as the JSONL drops their rows
            self._tb = modules["tensorboard"].SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                                            purge_step=start_step + 1)
        if "wandb" in modules:
            self._wandb_module = modules["wandb"]
            self._wandb = modules["wandb"].init(project=os.environ.get("WANDB_PROJECT", "megatron_regdpo"),
                                                name=run_name or self.run_dir.name, dir=str(self.run_dir),
                                                config=dict(config) if config is not None else None,
                                                **self._wandb_resume(start_step))
            (self.run_dir / WANDB_RUN_ID_FILE).write_text(self._wandb.id + "\n")
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr)

    def _wandb_resume(self, start_step: int) -> dict:
        """A run resumed from a checkpoint continues the W&B run its folder started (RUN_DIR/wandb_run_id), unless
        $WANDB_RUN_ID names one; a run starting at step 0 starts a new W&B run."""
        path = self.run_dir / WANDB_RUN_ID_FILE
        if start_step == 0 or os.environ.get("WANDB_RUN_ID") or not path.is_file():
            return {}
        return {"id": path.read_text().strip(), "resume": "allow"}

    def log(self, metrics: Mapping[str, float]) -> None:
        if "step" not in metrics:
            raise ValueError("a metrics dict needs its 'step'")
        if not self.active:
            return
        step = int(metrics["step"])
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items() if k != "step"})
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()  # in the OS now: survives the process being killed
        scalars = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if record.get(VIDEOS_KEY):
            self._log_videos(step, record[VIDEOS_KEY])
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if "loss/total" in record:
                self._bar.set_postfix(loss=f"{record['loss/total']:.4f}", refresh=False)
        if step % self.cfg.interval == 0:
            self.message(format_summary(record, self.total_steps))

    def _log_videos(self, step: int, files: Sequence[str]) -> None:
        """W&B: each mp4 as a wandb.Video; TensorBoard: its middle frame as an image (TensorBoard's add_video
        needs moviepy and writes GIFs). Tags eval/videos/<file stem>."""
        for name in files:
            path, tag = self.run_dir / name, f"{VIDEOS_KEY}/{Path(name).stem}"
            if self._wandb is not None:
                self._wandb.log({tag: self._wandb_module.Video(str(path), format="mp4")}, step=step)
            if self._tb is not None:
                self._tb.add_image(tag, middle_frame(path), step, dataformats="HWC")

    def message(self, text: str) -> None:
        """Print a line on the writer rank without breaking the progress bar (e.g. "saved step 300")."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream or sys.stdout)
        else:
            print(text, file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        for sink, close in ((self._file, "close"), (self._tb, "close"), (self._wandb, "finish"), (self._bar, "close")):
            if sink is not None:
                getattr(sink, close)()
        self._file = self._tb = self._wandb = self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def middle_frame(path):
    """The middle frame of a video file, uint8 [H, W, 3] (numpy)."""
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return frames[len(frames) // 2]

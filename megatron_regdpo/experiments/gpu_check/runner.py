"""The check's runner: steps in order, each timed and limited, every failure caught and recorded, results
written after every step (a run killed at any point leaves a valid gpu_check.json saying how far it got).

A step is a module of this package with `run(ctx) -> dict` and `summary(result) -> str`, imported only
when it starts (so nothing imports megatron-core or diffusers before the install step has run).
Statuses: ok (ran, its checks passed); fail (ran, a check failed: `failures` says which); error (raised:
the traceback is kept); skipped (the reason says why); pending (never reached); running (the run was
killed inside it). Limits are cooperative (a step sizes its work by `ctx.time_left()`); the whole check's
budget is enforced by a watchdog thread that kills child processes, records the step it interrupted and
ends the process.
"""
from __future__ import annotations

import datetime
import gc
import importlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from . import report
from .sizes import GPU, SMOKE

# (name, module, what it checks); the order of the run
STEPS = (
    ("install", "install", "install the carried wheels"),
    ("environment", "env", "(a) GPU, versions, matmul TFLOP/s, copy GB/s"),
    ("parity", "parity", "(b) bf16 parity with diffusers"),
    ("kernel", "kernel", "(c) Triton per-sample squared-error kernel"),
    ("step", "step", "(d) 1.3B Reg-DPO step: time, MFU, memory vs plan"),
    ("sampling", "sampling", "(e) negative sampling, 50 UniPC steps, CFG"),
    ("gpu_tests", "gpu_tests", "(f) tests/gpu via pytest"),
)
NOT_CHECKED = (
    "Transformer Engine (the `te` spec, FP8): its 276 MB wheel cannot travel; tests/gpu/test_te_backend.py skips",
    "DALI/NVDEC decoding: its 199 MB wheel cannot travel",
    "every multi-GPU layout (FSDP2, TP/SP, CP, PP over NCCL): one GPU; FSDP2 runs its one-GPU step in (d)",
)
MIN_STEP_S = 3.0


class Skip(Exception):
    """Raised by a step that cannot run here; the message is the recorded reason."""


class Context:
    """What a step sees: sizes, device, time left, the results so far, and child processes."""

    def __init__(self, sizes, out_dir: Path, wheel_dir: Path | None, site_dir: Path, repo_root: Path):
        self.sizes, self.out_dir, self.wheel_dir, self.site_dir = sizes, out_dir, wheel_dir, site_dir
        self.repo_root = repo_root
        self.device = "cpu" if sizes.mode == "cpu-smoke" else "cuda"
        self.start = time.monotonic()
        self.deadline = self.start + sizes.budget_s
        self.step_deadline = self.deadline
        self.site_active = False          # set by the install step: children get the folder on PYTHONPATH
        self.children: dict[int, subprocess.Popen] = {}
        self.lock = threading.RLock()
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.record = {"check": "megatron_regdpo gpu_check", "schema": 1, "mode": sizes.mode, "started": now,
                       "finished": None, "elapsed_s": None, "budget_s": sizes.budget_s, "host": platform.node(),
                       "python": platform.python_version(), "command": sys.argv, "not_checked": list(NOT_CHECKED),
                       "steps": {}}

    def time_left(self) -> float:
        return min(self.step_deadline, self.deadline) - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def result_of(self, step: str) -> dict:
        return self.record["steps"].get(step, {}).get("result") or {}

    def write(self) -> None:
        with self.lock:
            self.record["elapsed_s"] = round(self.elapsed(), 1)
            report.write(self.record, self.out_dir)

    def subprocess_env(self, **extra: str) -> dict:
        """The environment for a child: unbuffered, with the installed wheels and the repository importable."""
        paths = ([str(self.site_dir)] if self.site_active else []) + [str(self.repo_root)]
        old = os.environ.get("PYTHONPATH")
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(paths + ([old] if old else [])))
        env.update(extra)
        return env

    def start_process(self, cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, object]:
        """A child in its own process group, its output to a temporary file (never a full pipe)."""
        log = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.repo_root,
                                env=env or self.subprocess_env(), start_new_session=True, text=True)
        with self.lock:
            self.children[proc.pid] = proc
        return proc, log

    def finish_process(self, proc: subprocess.Popen, log, timeout: float) -> tuple[int, str, bool]:
        """(return code, output, timed out): waits up to `timeout`, then kills the child's group."""
        timed_out = False
        try:
            proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        finally:
            with self.lock:
                self.children.pop(proc.pid, None)
        log.seek(0)
        out = log.read()
        log.close()
        return proc.returncode, out, timed_out

    def run_process(self, cmd: list[str], env: dict | None = None, timeout: float | None = None):
        proc, log = self.start_process(cmd, env)
        return self.finish_process(proc, log, self.time_left() if timeout is None else timeout)

    def kill_children(self) -> None:
        with self.lock:
            for proc in list(self.children.values()):
                _kill_group(proc)
            self.children.clear()


def last_json_line(text: str) -> dict:
    """The last line of a child's output that parses as a JSON object (warnings may follow or precede it)."""
    import json

    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise RuntimeError(f"no JSON line in the child's output: {text[-2000:]}")


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill a child we started (its own session, so its group id is its pid) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _release_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _watchdog(ctx: Context, done: threading.Event) -> None:
    if done.wait(timeout=max(ctx.deadline - time.monotonic(), 0)):
        return
    ctx.kill_children()
    with ctx.lock:
        for entry in ctx.record["steps"].values():
            if entry["status"] == "running":
                entry.update(status="error", reason=f"killed: the check reached its {ctx.sizes.budget_s:.0f} s budget")
        ctx.record["finished"] = _now()
        ctx.write()
    print(f"gpu_check: budget of {ctx.sizes.budget_s:.0f} s reached; partial results in {ctx.out_dir}", flush=True)
    print(report.table(ctx.record), flush=True)
    os._exit(3)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _run_step(ctx: Context, name: str, module: str) -> None:
    entry = ctx.record["steps"][name]
    left = ctx.deadline - time.monotonic()
    if left < MIN_STEP_S:
        entry.update(status="skipped", reason=f"no time left ({left:.0f} s of the {ctx.sizes.budget_s:.0f} s budget)")
        return
    ctx.step_deadline = time.monotonic() + min(entry["limit_s"], left)
    with ctx.lock:
        entry.update(status="running", started=_now())
    ctx.write()
    print(f"[{ctx.elapsed():6.1f} s] {name}: start (limit {entry['limit_s']:.0f} s)", flush=True)
    t0 = time.monotonic()
    result = None
    try:
        mod = importlib.import_module(f"{__package__}.{module}")
        result = mod.run(ctx)
        status = "fail" if result.get("failures") else "ok"
        summary = _summary(mod, result)
        update = dict(status=status, result=result, summary=summary)
    except Skip as e:
        update = dict(status="skipped", reason=str(e), summary=str(e))
    except Exception as e:  # noqa: BLE001 - every failure is recorded and the next step runs
        update = dict(status="error", reason=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc(),
                      result=result, summary=f"{type(e).__name__}: {e}"[:200])
    seconds = time.monotonic() - t0
    with ctx.lock:
        entry.update(update, seconds=round(seconds, 2), over_limit=seconds > entry["limit_s"])
    _release_memory()
    ctx.write()
    print(f"[{ctx.elapsed():6.1f} s] {name}: {entry['status']} in {seconds:.1f} s: {entry.get('summary', '')}",
          flush=True)


def _summary(mod, result: dict) -> str:
    try:
        return mod.summary(result)
    except Exception as e:  # noqa: BLE001 - a broken summary must not lose the result
        return f"(no summary: {type(e).__name__}: {e})"


def run_check(sizes, out_dir: Path, wheel_dir: Path | None, site_dir: Path, repo_root: Path,
              only: tuple[str, ...] = ()) -> int:
    """Run the steps (all, or `only`); 0 when none failed or raised, else 1."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(sizes, out_dir, wheel_dir, site_dir, repo_root)
    for name, _, title in STEPS:
        if not only or name in only or name == "install":
            ctx.record["steps"][name] = {"title": title, "status": "pending", "limit_s": sizes.limits_s[name]}
    ctx.write()
    done = threading.Event()
    threading.Thread(target=_watchdog, args=(ctx, done), daemon=True).start()
    for name, module, _ in STEPS:
        if name in ctx.record["steps"]:
            _run_step(ctx, name, module)
    done.set()
    with ctx.lock:
        ctx.record["finished"] = _now()
        ctx.write()
    print(f"results: {out_dir / report.JSON_NAME}, {out_dir / report.MD_NAME}", flush=True)
    print(report.table(ctx.record), flush=True)
    bad = [e for e in ctx.record["steps"].values() if e["status"] in ("fail", "error")]
    return 1 if bad else 0


def main(out: str, *, cpu_smoke: bool = False, wheels: str | None = ".whl", site: str | None = None,
         only: str | None = None, repo_root: str | Path | None = None) -> int:
    """Entry point of tools/gpu_check.py. ValueError for bad input (the tool prints it as one line)."""
    sizes = SMOKE if cpu_smoke else GPU
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    names = tuple(n for n, _, _ in STEPS)
    chosen = tuple(s.strip() for s in only.split(",") if s.strip()) if only else ()
    unknown = [s for s in chosen if s not in names]
    if unknown:
        raise ValueError(f"--only {only}: unknown step(s) {', '.join(unknown)}; steps are {', '.join(names)}")
    if not cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("no CUDA device is visible (torch.cuda.is_available() is False); "
                             "on a machine without a GPU run --cpu-smoke")
    root = Path(repo_root) if repo_root else Path(__file__).resolve().parents[3]
    wheel_dir = (root / wheels if not Path(wheels).is_absolute() else Path(wheels)) if wheels else None
    site_dir = Path(site) if site else Path(tempfile.gettempdir()) / "regdpo_gpu_check_site"
    return run_check(sizes, out_dir, wheel_dir, site_dir, root, chosen)

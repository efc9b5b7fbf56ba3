"""A training process's ties to its launcher: it takes the stop signals back, it dies with torchrun, and it
tells the launcher how it ended.

launch/torchrun.sh starts torchrun with SIGTERM/SIGINT ignored (torchrun would otherwise turn a
scheduler's signal into a SIGTERM to the workers, a SIGKILL 30 s later and exit 1), and an ignored
signal stays ignored across exec: the workers inherit it. `take_stop_signals` gives them the default
meaning back until the trainer installs its own handler at the first step.

A worker whose launcher is SIGKILLed is re-parented and would train on, writing checkpoints beside a
rerun. `exit_with_launcher` watches the parent pid and kills this process when the parent changes: no
exit handler runs, so a save in progress is never published (it stays iter_N.partial), and the
checkpoint writers it forked die with it (checkpoint_io.megatron_ckpt.writers_die_with_this_process).

A worker that stops on a user error prints one line and exits 1 or 2 (train.py); one that crashes prints a
traceback and exits 1 too. `report_exit_to_launcher` tells them apart for megatron_regdpo.launcher, in the
error file torchrun's agent gives each worker (TORCHELASTIC_ERROR_FILE, read into its ChildFailedError): a
crash writes its traceback there (as torch's @record would), any other exit writes SAID.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import signal
import sys
import threading
import time
import traceback

POLL_S = 0.5
SPEAKER_WAIT_S = 5.0
SAID = "exited by itself, without a traceback: an error is the worker's own line above"  # the launcher's cue


def take_stop_signals() -> None:
    """SIGTERM and SIGINT back to their defaults where they arrive ignored (only then: a caller's own
    handler stays)."""
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ  # set by torchrun's agent for each worker it starts


def exit_with_launcher(poll_s: float = POLL_S) -> threading.Thread | None:
    """Under torchrun, start a daemon thread that kills this process once its parent (the agent) is gone.
    A poll, not prctl(PR_SET_PDEATHSIG): that fires when the parent *thread* that forked us exits, and it
    can only be set before exec, in torchrun's code. Also reports how this worker ends
    (report_exit_to_launcher)."""
    if not under_torchrun():
        return None
    report_exit_to_launcher()
    parent = os.getppid()
    if parent == 1:  # already orphaned before we looked
        _die(parent)

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        _die(parent)

    thread = threading.Thread(target=watch, name="exit-with-launcher", daemon=True)
    thread.start()
    return thread


def _die(parent: int) -> None:
    print(f"error: rank {os.environ.get('RANK', '?')}: the launcher (pid {parent}) is gone; stopping this "
          f"worker (pid {os.getpid()}) without saving", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def report_exit_to_launcher() -> None:
    """Under torchrun, write how this process ends to its error file: an uncaught exception as torch's @record
    writes it (the launcher then shows torchrun's report with the traceback), any other exit (sys.exit, the
    end of main) as SAID, and then, on a rank other than the node's first, waits for the first to end (at
    most SPEAKER_WAIT_S): it prints train.py's error line. A process killed by a signal writes nothing.
    Ctrl-C (KeyboardInterrupt, SIGINT during setup) is a stop, not a crash: no traceback per rank; the
    launcher says it once."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    crashed, previous = [], sys.excepthook

    def on_uncaught(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            return
        crashed.append(kind)
        _write_error_file(path, f"{kind.__name__}: {value}", "".join(traceback.format_exception(kind, value, tb)))
        previous(kind, value, tb)

    def on_exit():
        if crashed:
            return
        _write_error_file(path, SAID)
        # train.py's other ranks exit silently: torchrun would stop the node's first process, still printing
        # the error or on its way out, when one of them ends first. Wait (bounded) until it has ended.
        speaker, deadline = _speakers_error_file(path), time.monotonic() + SPEAKER_WAIT_S
        while speaker is not None and not os.path.exists(speaker) and time.monotonic() < deadline:
            time.sleep(0.02)

    sys.excepthook = on_uncaught
    atexit.register(on_exit)


def parse_on_every_rank(parse, argv=None):
    """parse(argv) as every rank runs it under torchrun: a usage error is printed by the node's first process
    only (argparse prints it and exits 2 on each rank alike); the others exit 2 without it. Call after
    exit_with_launcher, so that the launcher knows the error was said and adds nothing."""
    if not under_torchrun() or os.environ.get("LOCAL_RANK", "0") == "0":
        return parse(argv)
    with contextlib.redirect_stderr(io.StringIO()):
        return parse(argv)


def _speakers_error_file(path: str) -> str | None:
    """Local rank 0's error file, beside ours (torchrun's agent: ATTEMPT_DIR/LOCAL_RANK/error.json); None on
    local rank 0 itself or another layout."""
    rank_dir = os.path.dirname(path)
    local = os.environ.get("LOCAL_RANK", "0")
    if local == "0" or os.path.basename(rank_dir) != local:
        return None
    return os.path.join(os.path.dirname(rank_dir), "0", os.path.basename(path))


def _write_error_file(path: str, message: str, callstack: str | None = None) -> None:
    """torch's @record format (torch.distributed.elastic's ErrorHandler.record_exception)."""
    info = {"timestamp": str(int(time.time())), **({"py_callstack": callstack} if callstack else {})}
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": info}}, f)
    except OSError:  # no error file: the launcher shows torchrun's report, as for any worker
        pass

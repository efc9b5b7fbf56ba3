"""A training process's ties to its launcher: it takes the stop signals back, and it dies with torchrun.

launch/torchrun.sh starts torchrun with SIGTERM/SIGINT ignored (torchrun would otherwise turn a
scheduler's signal into a SIGTERM to the workers, a SIGKILL 30 s later and exit 1), and an ignored
signal stays ignored across exec: the workers inherit it. `take_stop_signals` gives them the default
meaning back until the trainer installs its own handler at the first step.

A worker whose launcher is SIGKILLed is re-parented and would train on, writing checkpoints beside a
rerun. `exit_with_launcher` watches the parent pid and kills this process when the parent changes: no
exit handler runs, so a save in progress is never published (it stays iter_N.partial), and the
checkpoint writers it forked die with it (checkpoint_io.megatron_ckpt.writers_die_with_this_process).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

POLL_S = 0.5


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
    can only be set before exec, in torchrun's code."""
    if not under_torchrun():
        return None
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

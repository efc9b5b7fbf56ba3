"""No leftovers: every process a test session starts carries the session's token in its environment
(inherited from the tag set at session start), so at session end the live ones can be found, named and
ended by pid (kill_all). Used by tests/conftest.py; tests/unit/test_no_leftovers.py proves it works."""
from __future__ import annotations

import os
import uuid

import psutil

from megatron_regdpo.parallel.procs import kill_all  # noqa: F401 -- ends what carrying() finds

TOKEN_VAR = "MEGATRON_REGDPO_TEST_SESSION"


def tag_session() -> str:
    """A fresh token for this session, added to those of any enclosing session: a nested session (a test
    that runs pytest) must not claim, and end, its parent's processes, while the parent still finds a
    nested session's leftovers if that session could not end them itself. Every process started from
    now on inherits it."""
    token = uuid.uuid4().hex
    os.environ[TOKEN_VAR] = " ".join(filter(None, [os.environ.get(TOKEN_VAR), token]))
    return token


def _own_resource_tracker(p: psutil.Process) -> bool:
    # multiprocessing's helper for this very process (started by its first spawn); it ends when this
    # process exits, so it is the session's own machinery, not a test's leftover
    return p.ppid() == os.getpid() and "multiprocessing.resource_tracker" in " ".join(p.cmdline())


def carrying(token: str) -> list[psutil.Process]:
    """Live processes (zombies are dead, only not yet reaped) whose environment holds `token`, other
    than this process and its own resource tracker."""
    found = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if (token in p.environ().get(TOKEN_VAR, "").split() and p.status() != psutil.STATUS_ZOMBIE
                    and not _own_resource_tracker(p)):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone meanwhile, or another user's
            pass
    return found


def describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid}: {' '.join(p.cmdline())[:300]}"
    except psutil.NoSuchProcess:
        return f"pid {p.pid}: (gone)"


def wait_for(predicate, proc, timeout: float) -> bool:
    """Poll `predicate` until it holds (True), `proc` ends or `timeout` s pass (False)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def output_of(proc) -> str:
    """A started process's output so far, for a failure message (its tree is ended first: it may still run)."""
    from megatron_regdpo.parallel.procs import kill_tree

    if proc.poll() is None:
        kill_tree(proc.pid)
    return proc.communicate()[0]

"""End a process tree by pid: a killed trainer must not leave its ranks, checkpoint writers or resource
tracker running. Light (psutil only), so the test session's leftover guard can import it cheaply."""
from __future__ import annotations

import subprocess
import time

import psutil


def run_tree(cmd: list[str], timeout: float | None = None, **popen_kwargs) -> int:
    """subprocess.run(cmd).returncode, except that on a timeout (subprocess.TimeoutExpired) or an interrupt
    the whole tree is ended, by pid: killing only a launcher such as torchrun (as subprocess.run does)
    orphans its ranks."""
    proc = subprocess.Popen(cmd, **popen_kwargs)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()


def stop_tree(pid: int) -> list[psutil.Process]:
    """SIGSTOP process `pid` and everything under it; return them, root first. Each is stopped before its
    children are listed, so none starts one unseen; and all are found while still attached to the tree
    (a process whose parent is killed is re-parented and can no longer be found from the root)."""
    try:
        todo = [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return []
    procs = []
    while todo:
        p = todo.pop(0)
        try:
            p.suspend()
            todo += p.children()
        except psutil.NoSuchProcess:
            continue
        procs.append(p)
    return procs


def kill_tree(pid: int, timeout: float = 10.0) -> list[psutil.Process]:
    """SIGKILL process `pid` and everything under it (a trainer's ranks, its checkpoint writers, their
    resource tracker); return those still alive after `timeout` s."""
    return kill_all(stop_tree(pid), timeout)


def kill_all(procs: list[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """SIGKILL each, by pid (psutil refuses a pid that now names another process); return those still
    alive after `timeout` s."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return wait_gone(procs, timeout)


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to `timeout` s for each to end; return those still alive. A zombie has ended: it only
    waits for its parent (for an orphan, init) to reap it."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

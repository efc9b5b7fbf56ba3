"""FolderLock: one holder per folder, stale locks (holder gone, pid reused) taken over with a warning,
and the store's writer lock."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import psutil
import pytest

from megatron_regdpo.parallel.lock import FolderLock, LockHeld, holder_alive
from megatron_regdpo.parallel.procs import kill_tree

HOLD = """
import sys, time
from megatron_regdpo.parallel.lock import FolderLock
FolderLock(sys.argv[1], "run folder x").acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another live process holding tmp_path/run.lock; ended by pid after the test."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run.lock")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    kill_tree(proc.pid)
    proc.communicate()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_holder_fails_naming_folder_host_pid_and_start(tmp_path, holder):
    with pytest.raises(LockHeld) as e:
        FolderLock(tmp_path / "run.lock", f"run folder {tmp_path}").acquire()
    msg = str(e.value)
    assert f"run folder {tmp_path} is in use by host {socket.gethostname()}, pid {holder.pid}, started " in msg


def test_released_lock_is_free_and_gone(tmp_path):
    with FolderLock(tmp_path / "run.lock", "x"):
        body = json.loads((tmp_path / "run.lock").read_text())
        assert (body["host"], body["pid"]) == (socket.gethostname(), os.getpid())
    assert not (tmp_path / "run.lock").exists()
    FolderLock(tmp_path / "run.lock", "x").acquire().release()


def test_lock_of_a_killed_holder_is_taken_over_with_a_warning(tmp_path, holder, capsys):
    body = json.loads((tmp_path / "run.lock").read_text())
    kill_tree(holder.pid)          # SIGKILL: the kernel drops its flock, its body stays
    holder.wait()
    with FolderLock(tmp_path / "run.lock", "run folder x"):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert "warning: run folder x: taking over the stale lock" in err and f"pid {body['pid']}" in err


@pytest.mark.parametrize("case", ["pid gone", "pid reused"])
def test_flock_kept_by_a_survivor_of_a_dead_holder_is_stale(tmp_path, holder, capsys, case):
    # the live `holder` keeps the flock, but the body names a process that is gone, or a pid now used by a
    # later process (this one): as when a descendant that inherited the open file outlives the holder
    pid, start = (_dead_pid(), 0.0) if case == "pid gone" else (os.getpid(), 1.0)
    (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "start_time": start}))
    assert holder_alive(json.loads((tmp_path / "run.lock").read_text())) is False
    lock = FolderLock(tmp_path / "run.lock", "x").acquire()
    assert f"taking over the stale lock {tmp_path / 'run.lock'} of a process that is gone" in capsys.readouterr().err
    lock.release()
    assert holder_alive({"host": socket.gethostname(), "pid": holder.pid,
                         "start_time": psutil.Process(holder.pid).create_time()}) is True


def test_another_hosts_lock_is_held(tmp_path, holder):
    (tmp_path / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "start_time": 0, "started": "then"}))
    with pytest.raises(LockHeld, match="host elsewhere, pid 1, started then"):
        FolderLock(tmp_path / "run.lock", "x").acquire()


def test_store_has_one_writer_and_any_readers(tmp_path):
    from megatron_regdpo.data.store.store import GTPairStore

    path = tmp_path / "pairs.zarr"
    writer = GTPairStore.open_or_create(path, {"task": "t2v"})
    again = GTPairStore(path, "a")  # the same process may open it twice
    GTPairStore(path, "r")
    code = f"from megatron_regdpo.data.store.store import GTPairStore; GTPairStore({str(path)!r}, 'a')"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert other.returncode != 0 and f"store {path} is in use by host" in other.stderr, other.stderr
    del writer, again
    assert not (path / "writer.lock").exists()
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr

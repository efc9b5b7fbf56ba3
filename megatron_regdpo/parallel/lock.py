"""One writer per folder: a lock file whose body names its holder (host, pid, process start time).

The lock is an exclusive fcntl.flock on the file, so the kernel drops it when the holder dies, SIGKILL
included; the JSON body only serves the messages. A lock is stale, and taken over with a warning, when
its flock is free (the holder ended without releasing it), or when the flock is still held but the body
names a process on this host that no longer exists, or whose pid now belongs to a later process (a
descendant that inherited the open file keeps the flock after the holder died). A lock held by a live
process, or by one on another host (which cannot be checked from here), is an error.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import psutil


class LockHeld(RuntimeError, ValueError):
    """Another live process holds the lock; the message names the folder and the holder. A ValueError too:
    the tools print those as one `error:` line (tools/preprocess_videos.py, tools/make_gt_pairs.py)."""


def _holder_body() -> dict:
    start = psutil.Process().create_time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_time": start,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))}


def _warn(message: str) -> None:
    # a plain line, not warnings.warn: launchers and tests often silence Python warnings
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')}")


def holder_alive(holder: dict) -> bool | None:
    """True/False for a holder on this host; None for another host's (not checkable from here)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        # a reused pid belongs to a process started later than the holder
        return abs(psutil.Process(int(holder["pid"])).create_time() - float(holder["start_time"])) < 1.0
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return False


# lock files this process holds: a second FolderLock on the same file in this process
# shares the first one's (a tool may open a store for writing twice), instead of failing against itself
_HELD: dict[Path, list] = {}  # path -> [fd, holders, pid]


class FolderLock:
    """`FolderLock(path, what).acquire()` ... `.release()`, or use it as a context manager. `path` is the
    lock file; `what` names the guarded thing in messages ("run folder /x/run", "store /x/pairs.zarr")."""

    def __init__(self, path: str | Path, what: str):
        self.path, self.what, self._fd = Path(path).absolute(), what, None

    def _read(self, fd: int) -> dict:
        try:
            body = os.pread(fd, 4096, 0).decode()
            return json.loads(body) if body.strip() else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "FolderLock":
        if self.path in _HELD and _HELD[self.path][2] == os.getpid():
            _HELD[self.path][1] += 1
            self._fd = _HELD[self.path][0]
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # a retry only follows a stale takeover or a release racing with us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    os.close(fd)
                    raise
                holder = self._read(fd)
                os.close(fd)
                if holder and holder_alive(holder) is False:  # a descendant of a dead holder keeps the flock
                    _warn(f"{self.what}: taking over the stale lock {self.path} of a process that is gone "
                          f"({_describe(holder)})")
                    self._unlink_if(holder)
                    continue
                raise LockHeld(f"{self.what} is in use by {_describe(holder) if holder else 'another process'} "
                               f"(lock file {self.path}); stop that run first, or use another folder") from None
            try:  # locked; but the file may have been unlinked (released or taken over) after our open
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = self._read(fd)
            if old:
                _warn(f"{self.what}: taking over the stale lock {self.path} left by a process that ended "
                      f"without releasing it ({_describe(old)})")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder_body()).encode(), 0)
            os.fsync(fd)
            self._fd, _HELD[self.path] = fd, [fd, 1, os.getpid()]
            return self
        raise LockHeld(f"{self.what}: could not take {self.path} (it keeps changing hands)")

    def _unlink_if(self, holder: dict) -> None:
        try:  # only the file that still names that holder: another process may have taken it over already
            if json.loads(self.path.read_text() or "{}") == holder:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def release(self) -> None:
        if self._fd is None:
            return
        self._fd, entry = None, _HELD.get(self.path)
        if entry is None or entry[2] != os.getpid():  # a forked child's copy: the lock is its parent's
            return
        entry[1] -= 1
        if entry[1] > 0:  # another FolderLock of this process still holds it
            return
        del _HELD[self.path]
        try:
            self.path.unlink()  # while still locked: no one else can be holding this file
        except FileNotFoundError:
            pass
        os.close(entry[0])  # closing drops the flock

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

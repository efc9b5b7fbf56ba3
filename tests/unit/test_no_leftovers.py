"""No process a test session starts outlives it: the session guard (tests/_procs.py, tests/conftest.py)
finds and ends leftovers and fails the run; a process tree ends by pid; a save starts nothing lasting and
its writer processes die with a killed saver."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
import torch
from _procs import TOKEN_VAR, carrying, wait_for

from megatron_regdpo.parallel.procs import kill_all, kill_tree, run_tree, wait_gone

ROOT = Path(__file__).resolve().parents[2]
SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]


def test_detector_finds_a_detached_child_and_it_ends_by_pid():
    token = uuid.uuid4().hex  # a token of its own (a nested session's): independent of what else runs
    child = subprocess.Popen(SLEEP, env={**os.environ, TOKEN_VAR: f"{os.environ[TOKEN_VAR]} {token}"},
                             start_new_session=True)
    try:
        # out of our process group, still found (once it has exec'd: until then it carries our environment)
        assert wait_for(lambda: [p.pid for p in carrying(token)] == [child.pid], child, timeout=30)
        assert kill_all(carrying(token)) == []
        assert child.wait(timeout=10) == -9
        assert carrying(token) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_leaking_session_fails_and_its_leftover_is_ended(tmp_path):
    marker = uuid.uuid4().hex  # names the leaked process
    (tmp_path / "test_leak.py").write_text(
        "import subprocess, sys\n\n"
        "def test_passes_but_leaks():\n"
        f"    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)  # {marker}'],\n"
        "                     start_new_session=True)\n")
    path = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    try:  # this suite's conftest as a plugin, in a session of its own (own token) rooted in tmp_path
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                               "test_leak.py"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": path},
                              capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1 and "1 passed" in out, out
        assert "1 leftover process(es) started by this session" in out and marker in out and "killed 1" in out, out
        assert _live(marker) == []
    finally:
        kill_all(_live(marker))  # should that session not have ended it (it timed out, say): by pid


def _live(marker: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline", "status"])
            if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]


def test_kill_tree_ends_the_grandchildren_too():
    root = subprocess.Popen(["sh", "-c", "sh -c 'sleep 600 & wait' & sleep 600 & wait"])
    try:
        tree = [psutil.Process(root.pid)]
        while len(tree) < 4:  # sh, sh, sleep, sleep
            tree = [tree[0], *tree[0].children(recursive=True)]
        assert kill_tree(root.pid) == []
        assert root.wait(timeout=10) == -9 and wait_gone(tree, 0) == []   # orphans did not survive it
    finally:
        if root.poll() is None:
            kill_tree(root.pid)
            root.wait()


def test_run_tree_timeout_ends_the_whole_tree():
    marker = uuid.uuid4().hex  # in every command line of the tree
    py = f'{sys.executable} -c "import time; time.sleep(600)" {marker}'
    with pytest.raises(subprocess.TimeoutExpired):
        run_tree(["sh", "-c", f"sh -c '{py} & wait' & {py} & wait # {marker}"], timeout=2)
    assert _live(marker) == []


def test_a_save_leaves_no_process_running(pg, tmp_path):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_regdpo.checkpoint_io.megatron_ckpt import save_sharded

    before = set(psutil.Process().children())
    save_sharded({"w": ShardedTensor.from_rank_offsets("w", torch.randn(8, 4), replica_id=0)}, tmp_path)
    assert (tmp_path / "metadata.json").is_file()
    # megatron-core's own results queue would start a Manager server process (+ resource tracker) here
    assert set(psutil.Process().children()) - before == set()


_SAVER = """
import multiprocessing as mp, time
from megatron_regdpo.checkpoint_io.megatron_ckpt import writers_die_with_this_process
fork = mp.get_context("fork")  # as megatron-core <= 0.16 starts its checkpoint writers
with writers_die_with_this_process():
    writer = fork.Process(target=time.sleep, args=(600,))
    writer.start()
other = fork.Process(target=time.sleep, args=(600,))
other.start()
print(writer.pid, other.pid, flush=True)
time.sleep(600)
"""


def test_writers_die_with_a_killed_saver():
    saver = subprocess.Popen([sys.executable, "-W", "ignore", "-c", _SAVER], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    forked = []
    try:
        forked = [psutil.Process(int(pid)) for pid in saver.stdout.readline().split()]
        assert len(forked) == 2
        saver.kill()  # the saver only
        saver.wait()
        writer, other = forked
        assert wait_gone([writer], 10) == []          # died with it
        assert wait_gone([other], 0.5) == [other]     # an ordinary fork outlives it: the hook is what did it
    finally:
        if saver.poll() is None:
            kill_tree(saver.pid)
            saver.wait()
        kill_all(forked)

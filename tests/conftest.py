"""Shared fixtures: one single-process distributed setup per session, a fixed seed per test; a session
that leaves a process it started alive fails (tests/_procs.py)."""
from __future__ import annotations

import sys

import _procs
import pytest
import torch

SESSION_TOKEN = pytest.StashKey[str]()


def pytest_configure(config):
    # third-party warnings known to be harmless (TE/Apex absent on CPU, megatron-core and torch DCP deprecations)
    # only drown the real ones: the same list the training entry point hides, each entry saying why
    from megatron_regdpo.training.startup import pytest_filterwarnings

    for line in pytest_filterwarnings():
        config.addinivalue_line("filterwarnings", line)
    config.stash[SESSION_TOKEN] = _procs.tag_session()


@pytest.hookimpl(trylast=True)  # after pytest's own session teardown (session fixtures)
def pytest_sessionfinish(session):
    """Any process this session started that is still alive is a leftover: name it, end it (by pid), and
    fail the run, even when every test passed."""
    left = _procs.carrying(session.config.stash[SESSION_TOKEN])
    if not left:
        return
    lines = [_procs.describe(p) for p in left]
    alive = _procs.kill_all(left)
    lines.append(f"killed {len(left) - len(alive)}" + (f"; still alive: {[p.pid for p in alive]}" if alive else ""))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("=", f"{len(left)} leftover process(es) started by this session", red=True)
        for line in lines:
            reporter.write_line(line)
    else:
        print("leftover processes:", *lines, sep="\n", file=sys.stderr)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def pg():
    """Single-process gloo + Megatron parallel_state (tp=pp=cp=1); the ProcessGroupCollection."""
    from megatron_regdpo.parallel.groups import destroy_distributed, init_distributed

    collection = init_distributed()
    yield collection
    destroy_distributed()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread is much faster than two on a loaded 2-core machine (threads wait on each
    other). A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fused_cpu_kernels():
    """The Wan block's fused CPU kernels (kernels/wan_cpu), built on first use. A machine that cannot build
    them fails here (the CI machine has g++ and ninja); REGDPO_DISABLE_CPU_KERNELS=1 skips what needs them."""
    from kernels import wan_cpu

    ok, why = wan_cpu.status()
    if not ok and why.startswith("disabled"):
        pytest.skip(f"fused CPU kernels {why}")
    assert ok, why
    return wan_cpu.ops()

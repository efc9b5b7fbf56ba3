"""The Triton sq-err kernels on CPU, through the Triton interpreter, in a subprocess.

TRITON_INTERPRET=1 must be set before triton is first imported, which in this pytest process may already
have happened; the cases live in _sq_err_interp_cases.py and run in a fresh interpreter.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CASES = Path(__file__).with_name("_sq_err_interp_cases.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_match_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("REGDPO_DISABLE_TRITON", None)
    # the repository root first: `kernels` is a top-level package of this checkout
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, str(CASES)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    report = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert "PASSED" in proc.stdout, report

"""(f) tests/gpu through pytest, in a child process (its own CUDA context and distributed world), killed
at the step's limit. What one GPU cannot run skips with pytest's reason (Transformer Engine absent, FSDP
needing two GPUs); on the CPU the same run checks that those tests skip cleanly and the CPU-only ones pass."""
from __future__ import annotations

import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

TESTS = "tests/gpu"


def parse_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                detail = (node.get("message") or node.text or "")[:400]
                break
        module = (case.get("classname") or "").split(".")[-1]
        cases.append({"test": f"{module}::{case.get('name', '')}",
                      "outcome": outcome, "s": float(case.get("time") or 0.0), "detail": detail})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def run(ctx) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}", TESTS]
        rc, out, timed_out = ctx.run_process(cmd)
        result = parse_junit(junit) if junit.exists() else {"counts": {}, "cases": []}
    result.update(command=f"python -m pytest -q -rs {TESTS}", returncode=rc, timed_out=timed_out,
                  output_tail=out[-2500:])
    failures = []
    if timed_out:
        failures.append(f"pytest killed at the step's limit ({ctx.sizes.limits_s['gpu_tests']} s)")
    if result["counts"].get("failed") or result["counts"].get("error"):
        failures += [f"{c['test']}: {c['outcome']}: {c['detail'][:200]}" for c in result["cases"]
                     if c["outcome"] in ("failed", "error")]
    if rc not in (0, 5) and not failures:   # 5: nothing collected
        failures.append(f"pytest exited with {rc}")
    result["failures"] = failures
    return result


def summary(r: dict) -> str:
    c = r["counts"]
    text = ", ".join(f"{v} {k}" for k, v in c.items() if v) or f"no results (rc {r['returncode']})"
    return text + ("; killed at the limit" if r["timed_out"] else "")

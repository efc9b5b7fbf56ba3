#!/usr/bin/env python3
"""The one-call GPU check: install the carried wheels, then (a) environment, (b) bf16 parity with diffusers,
(c) the Triton kernel, (d) the 1.3B Reg-DPO step, (e) negative sampling, (f) tests/gpu, in 8 minutes.

  python3 tools/gpu_check.py --out DIR [--wheels .whl] [--site /tmp/...] [--only step,sampling]
  python3 tools/gpu_check.py --out DIR --cpu-smoke      # the same code at tiny sizes on the CPU (CI)

Writes DIR/gpu_check.json (after every step) and DIR/gpu_check.md, prints a short table last; exit code 0
when no step failed or raised. Runs from a bare checkout (the package is imported from this repository).
See docs/gpu.md; the logic lives in megatron_regdpo/experiments/gpu_check/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    ap = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md (created)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    ap.add_argument("--wheels", default=".whl", help="wheel folder, relative to the repository (tools/gpu_wheels.sh)")
    ap.add_argument("--site", help="where the wheels are installed (default: a folder under the temp dir)")
    ap.add_argument("--only", help="comma-separated steps to run (install always runs)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))   # the package is not installed on a bare GPU machine
    from megatron_regdpo.experiments.gpu_check import main as run_check

    try:
        return run_check(args.out, cpu_smoke=args.cpu_smoke, wheels=args.wheels, site=args.site, only=args.only,
                         repo_root=ROOT)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

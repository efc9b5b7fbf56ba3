#!/usr/bin/env python
"""Plot a run's metrics as a one-page PNG dashboard.

  python tools/plot_run.py RUN_DIR [--out PNG] [--smooth N]

Reads RUN_DIR/metrics.jsonl (written by the trainer when logging.jsonl=true), writes RUN_DIR/dashboard.png
by default. Works on a run in progress or a killed one. Exit 1 with the file (and line) named when the
metrics cannot be read.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="the run's output directory (run.output_dir/run.name)")
    ap.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/dashboard.png)")
    ap.add_argument("--smooth", type=int, default=1, help="moving-average window in steps (default 1: raw)")
    args = ap.parse_args(argv)
    from megatron_regdpo.training.metrics import MetricsFileError
    from megatron_regdpo.training.plot import plot_run

    try:
        out = plot_run(args.run_dir, args.out, smooth=args.smooth)
    except (FileNotFoundError, MetricsFileError, ValueError) as e:
        print(f"plot_run: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

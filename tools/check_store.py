#!/usr/bin/env python
"""Validate a GT-Pair store and print its counts.

  python tools/check_store.py STORE [--quick] [--json] [--repair]

Exit 0 when valid; 1 with each problem named when not (e.g. an interrupted run: rerun it to finish).
--quick skips reading the array data (shapes and commits only). --repair first fixes a store whose commit
log names samples more than once (two writers at once), keeping every sample whose arrays read back
(megatron_regdpo/data/store/repair.py), then checks it; exit 2 when the store is in use by a run.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--quick", action="store_true", help="do not decompress the arrays")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--repair", action="store_true", help="drop duplicate commits (samples committed twice)")
    args = ap.parse_args(argv)
    from megatron_regdpo.data.store import check_store, repair_store

    if args.repair:
        try:
            print(repair_store(args.store).format(), file=sys.stderr if args.json else sys.stdout)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    report = check_store(args.store, deep=not args.quick)
    if args.json:
        print(json.dumps({"ok": report.ok, "counts": report.counts, "generators": report.generators,
                          "problems": report.problems}, indent=1))
    else:
        print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

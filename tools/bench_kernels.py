#!/usr/bin/env python
"""Benchmark the per-sample squared-error sum (forward + backward) against the memory-traffic floor.

  python tools/bench_kernels.py [--sizes 65536,1048576] [--n 2] [--dtypes float32,bfloat16] [--out FILE]

On CUDA: the Triton kernel and the torch reference, each with its ratio to a measured device copy (goal for
Triton: >= 0.85). On CPU: the torch reference only (Triton compiles for GPUs only). One JSON line per
measurement is appended to --out (default runs/bench_kernels.jsonl). The logic lives in megatron_regdpo/experiments/kernels.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

CPU_SIZES = "65536,524288,2097152"
CUDA_SIZES = "1228800,4838400,16777216"  # a 14B 720p latent per CP-4 rank, a full one, a large one


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", help=f"elements per sample M (default CPU {CPU_SIZES}, CUDA {CUDA_SIZES})")
    ap.add_argument("--n", type=int, default=2, help="samples N (a winner and a loser: 2)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="runs/bench_kernels.jsonl")
    args = ap.parse_args(argv)

    import torch

    from kernels.capability import triton_status
    from megatron_regdpo.experiments.kernels import bench_sq_err, format_table

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sizes = [int(s) for s in (args.sizes or (CUDA_SIZES if cuda else CPU_SIZES)).split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    usable, why = triton_status(device)
    backends = ["triton", "torch"] if usable else ["torch"]
    print(f"device: {device}; Triton: {why}")

    rows = []
    for dtype in dtypes:
        for M in sizes:
            for backend in backends:
                rows.append(bench_sq_err(args.n, M, dtype, device, backend, iters=args.iters))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(format_table(rows))
    print(f"{len(rows)} measurements appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

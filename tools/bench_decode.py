#!/usr/bin/env python
"""Benchmark decode + normalise (PyAV vs DALI-CPU, NVDEC on a GPU) on generated VP9 files at 480p and 720p,
against VAE-encode throughput. Writes JSONL and prints a markdown table.

  python tools/bench_decode.py [--workdir DIR] [--out runs/bench_decode.jsonl] [--real-vae-frames 5] [--quick]

--real-vae-frames N also times the real Wan2.1 VAE architecture (random weights) on N frames at 480p
(0 = skip; about 6 minutes for 5 frames on 2 CPU cores). --quick: tiny 112x64 sources, for a smoke test.
"""
from __future__ import annotations

import argparse
import sys
import tempfile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="where the generated videos go (default: a temporary folder)")
    ap.add_argument("--out", default="runs/bench_decode.jsonl")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny-vae-frames", type=int, default=17)
    ap.add_argument("--real-vae-frames", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="112x64 sources, 9 frames, no real VAE")
    args = ap.parse_args(argv)
    from megatron_regdpo.experiments.decode import markdown_table, run_bench

    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(sources={"tiny": (112, 64)}, frames=9, short_side=64, repeats=1, tiny_vae_frames=5,
                  real_vae_frames=0) if args.quick else dict(frames=args.frames, repeats=args.repeats,
                                                              tiny_vae_frames=args.tiny_vae_frames,
                                                              real_vae_frames=args.real_vae_frames)
        records = run_bench(args.workdir or tmp, args.out, **kw)
    print(markdown_table(records))
    print(f"\n{records[0]['machine']}, {records[0]['date']}; JSONL: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

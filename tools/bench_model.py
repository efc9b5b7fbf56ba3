"""Our Wan DiT against diffusers' WanTransformer3DModel on this machine: time, saved bytes, parity.

    python tools/bench_model.py [--dtype fp32,bf16] [--layers 4 --hidden 256 --heads 8 --tokens 320 --batch 2]
        [--text-tokens 64] [--repeats 15] [--threads N] [--out runs/bench_model.jsonl] [--quick]

One JSON line per dtype (appended to --out): forward (no graph) and forward+backward median seconds of
both models, their ratios (ours / diffusers; `*_ratio_paired`: the median of each repeat's own ratio, the
least sensitive to a shared machine's drift), the bytes autograd keeps for backward and their ratio, and
the max relative error of the outputs and parameter gradients between the two, and ours' forward+backward
once more with the fused CPU kernels off (`python_fwd_bwd_ratio_paired`, `fused_vs_python_paired`; the row's
`cpu_kernels` says whether they ran). Then a markdown table.
--quick: a tiny shape and 3 repeats (checks the plumbing and parity; its timings mean nothing).
Logic: megatron_regdpo/experiments/model_overhead.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_regdpo.experiments import model_overhead  # noqa: E402

QUICK = model_overhead.Shape(layers=2, hidden=64, heads=4, tokens=40, batch=2, text_tokens=8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="fp32,bf16", help=f"comma list of {','.join(model_overhead.DTYPES)}")
    default = model_overhead.Shape()
    for field in ("layers", "hidden", "heads", "tokens", "batch", "text_tokens"):
        ap.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(default, field))
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per measurement (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default="runs/bench_model.jsonl", help="JSONL, one line appended per dtype")
    ap.add_argument("--quick", action="store_true", help="tiny shape, 3 repeats: plumbing and parity only")
    args = ap.parse_args(argv)
    dtypes = [d for d in args.dtype.split(",") if d]
    unknown = [d for d in dtypes if d not in model_overhead.DTYPES]
    if unknown or not dtypes:
        ap.error(f"--dtype {args.dtype!r}: expected a comma list of {', '.join(model_overhead.DTYPES)}")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    shape = QUICK if args.quick else model_overhead.Shape(args.layers, args.hidden, args.heads, args.tokens,
                                                          args.batch, args.text_tokens)
    repeats = 3 if args.quick else args.repeats
    try:
        shape.arch()
    except ValueError as e:
        ap.error(str(e))

    import torch

    from megatron_regdpo.parallel.groups import distributed_session

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with distributed_session(world_size=1) as pg:
        rows = []
        for d in dtypes:
            print(f"{d}: {shape}, {repeats} repeats", flush=True)
            rows.append(model_overhead.measure(shape, d, pg, repeats))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "quick": args.quick}) + "\n")
    m = rows[0]["machine"]
    print(f"\n{shape}; {m['node']}, {m['cpus']} CPUs ({m['threads']} threads), torch {m['torch']}, "
          f"megatron-core {m['megatron_core']}, diffusers {m['diffusers']}")
    print(model_overhead.markdown(rows))
    print(f"records appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

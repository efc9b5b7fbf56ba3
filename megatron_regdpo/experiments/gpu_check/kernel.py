"""(c) The Triton per-sample squared-error kernel (kernels/sq_err): correct against torch, and its
bandwidth against a device copy (experiments/kernels.py's floor bytes and copy; goal >= 0.85 of the copy).

Correctness, per (N, M) and dtype, through the public autograd entry with backend="triton": sums against
the float64 reference (relative 1e-5: both accumulate in >= fp32, in another order), bitwise the same on
a second call (no atomics), grad_pred against the reference backward (fp32: 1e-6; bf16: 1 ulp, since the
Triton interpreter truncates to bf16 where compiled code rounds) and grad_target = -grad_pred exactly.
On the CPU the kernels run under the Triton interpreter, which must be switched on before triton is first
imported: in a child process (`python -m megatron_regdpo.experiments.gpu_check.kernel`).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .runner import Skip, last_json_line

BENCH_FIELDS = ("impl", "dtype", "N", "M", "fwd_ms", "bwd_ms", "fwd_gbs", "bwd_gbs", "copy_gbs", "fwd_vs_copy",
                "bwd_vs_copy")
GOAL_VS_COPY = 0.85
GRAD_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7}


def check_case(N: int, M: int, dtype: torch.dtype, device: str, seed: int) -> dict:
    from kernels.sq_err import per_sample_sq_err_sum, sq_err_sum_backward_reference, sq_err_sum_reference

    gen = torch.Generator(device).manual_seed(seed)
    pred = torch.randn(N, M, device=device, generator=gen).to(dtype).requires_grad_()
    target = torch.randn(N, M, device=device, generator=gen).to(dtype).requires_grad_()
    out = per_sample_sq_err_sum(pred, target, backend="triton")
    with torch.no_grad():
        again = per_sample_sq_err_sum(pred, target, backend="triton")
        ref = sq_err_sum_reference(pred.double(), target.double())
    sum_rel = ((out.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
    g_N = torch.randn(N, device=device, generator=gen)
    grad_pred, grad_target = torch.autograd.grad(out, (pred, target), g_N)
    with torch.no_grad():
        want = sq_err_sum_backward_reference(pred, target, g_N)
    grad_max_abs = (grad_pred.float() - want.float()).abs().max().item()
    grad_ok = torch.allclose(grad_pred.float(), want.float(), rtol=GRAD_RTOL[dtype], atol=1e-6)
    row = {"dtype": str(dtype).removeprefix("torch."), "N": N, "M": M, "sum_rel_err": sum_rel,
           "deterministic": bool(torch.equal(out, again)), "grad_max_abs_diff": grad_max_abs,
           "grad_ok": bool(grad_ok), "grad_target_is_neg": bool(torch.equal(grad_target, -grad_pred))}
    row["ok"] = row["sum_rel_err"] <= 1e-5 and row["deterministic"] and row["grad_ok"] and row["grad_target_is_neg"]
    return row


def kernel_check(device: str, shapes, bench_m, iters: int) -> dict:
    """Everything (c) measures on `device` (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    from kernels.capability import triton_status
    from megatron_regdpo.experiments.kernels import bench_sq_err

    usable, why = triton_status(device)
    if not usable:
        return {"skip": why}
    checks = [check_case(N, M, dtype, device, seed=i) for dtype in (torch.float32, torch.bfloat16)
              for i, (N, M) in enumerate(shapes)]
    bench = []
    for M in bench_m:
        for backend in ("triton", "torch"):
            row = bench_sq_err(2, M, torch.bfloat16, device, backend, warmup=2, iters=iters)
            bench.append({k: row[k] for k in BENCH_FIELDS if k in row})
    return {"triton": why, "checks": checks, "bench": bench,
            "failures": [f"{c['dtype']} N={c['N']} M={c['M']}: {c}" for c in checks if not c["ok"]]}


def _in_interpreter(ctx) -> dict:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise Skip("triton is not installed")
    s = ctx.sizes
    cmd = [sys.executable, "-m", __name__, "--device", "cpu", "--shapes", json.dumps(s.kernel_shapes),
           "--bench", ",".join(map(str, s.kernel_bench_m)), "--iters", str(s.timing_iters)]
    env = ctx.subprocess_env(TRITON_INTERPRET="1")
    env.pop("REGDPO_DISABLE_TRITON", None)
    rc, out, timed_out = ctx.run_process(cmd, env=env)
    if timed_out or rc != 0:
        raise RuntimeError(f"the interpreter child {'timed out' if timed_out else f'failed (rc {rc})'}:\n{out[-3000:]}")
    result = last_json_line(out)
    result["ran_in"] = "a child process under TRITON_INTERPRET=1 (CPU): correctness only, speeds mean nothing"
    return result


def run(ctx) -> dict:
    s = ctx.sizes
    if ctx.device == "cpu":
        result = _in_interpreter(ctx)
    else:
        result = kernel_check(ctx.device, s.kernel_shapes, s.kernel_bench_m, s.timing_iters)
    if "skip" in result:
        raise Skip(result["skip"])
    copy = ctx.result_of("environment").get("copy_gbs")
    for row in result["bench"]:
        if copy:
            row["fwd_vs_env_copy"] = row["fwd_gbs"] / copy
        if "fwd_vs_copy" in row:
            row["meets_goal"] = row["fwd_vs_copy"] >= GOAL_VS_COPY and row["bwd_vs_copy"] >= GOAL_VS_COPY
    result["goal"] = f"Triton forward and backward >= {GOAL_VS_COPY} of a same-size device copy (not a failure)"
    return result


def summary(r: dict) -> str:
    ok = sum(c["ok"] for c in r["checks"])
    tri = [b for b in r["bench"] if b["impl"] == "triton"]
    speed = ""
    if tri:
        b = tri[-1]
        speed = f"; M={b['M']}: fwd {b['fwd_gbs']:.4g} GB/s, bwd {b['bwd_gbs']:.4g} GB/s"
        if "fwd_vs_copy" in b:
            speed += f" ({b['fwd_vs_copy']:.2f}, {b['bwd_vs_copy']:.2f} of copy)"
    return f"{ok}/{len(r['checks'])} correctness cases ok{speed}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="(c) in a child process, printing one JSON line")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", required=True, help="JSON list of [N, M]")
    ap.add_argument("--bench", required=True, help="comma-separated M")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args(argv)
    shapes = [tuple(s) for s in json.loads(args.shapes)]
    result = kernel_check(args.device, shapes, [int(m) for m in args.bench.split(",")], args.iters)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

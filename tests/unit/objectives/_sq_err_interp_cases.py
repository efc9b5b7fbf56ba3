"""Triton sq-err kernels vs the torch reference, under the Triton interpreter on CPU.

Run by test_sq_err_kernel_interp.py as `TRITON_INTERPRET=1 python _sq_err_interp_cases.py` (the variable
must be set before triton is imported, hence a separate process). Exits non-zero with the traceback of the
first failing case; prints one line per case otherwise. Tolerances: sums rtol 1e-5 (both accumulate in
float32, in a different order); grad_pred bitwise in float32; in bfloat16 within 1 ulp (rtol 2**-7): the
interpreter TRUNCATES float32 -> bfloat16 (numpy has no bf16; checked: its results equal the truncated
reference bitwise), while torch and compiled Triton round to nearest even.
"""
from __future__ import annotations

import os
import random
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from kernels.capability import triton_status  # noqa: E402
from kernels.sq_err import per_sample_sq_err_sum, sq_err_sum_backward_reference, sq_err_sum_reference  # noqa: E402
from kernels.sq_err.triton_kernels import BLOCK, sq_err_sum_bwd_triton, sq_err_sum_fwd_triton  # noqa: E402
from megatron_regdpo.objectives.per_sample import per_sample_sq_err  # noqa: E402

TOL_GRAD = {torch.float32: dict(rtol=0, atol=0), torch.bfloat16: dict(rtol=2**-7, atol=1e-6)}


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g).to(dtype).requires_grad_(),
            torch.randn(shape, generator=g).to(dtype).requires_grad_())


def check_autograd(shape, dtype, seed):
    """Through the public function with backend='triton': values, both gradients, determinism."""
    pred, target = _inputs(shape, dtype, seed)
    out = per_sample_sq_err_sum(pred, target, backend="triton")
    torch.testing.assert_close(out, sq_err_sum_reference(pred, target), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_sample_sq_err_sum(pred, target, backend="triton"), out, rtol=0, atol=0)
    g_N = torch.randn(shape[0], generator=torch.Generator().manual_seed(seed + 1))
    grad_pred, grad_target = torch.autograd.grad(out, (pred, target), g_N)
    with torch.no_grad():
        want = sq_err_sum_backward_reference(pred, target, g_N)
    torch.testing.assert_close(grad_pred, want, **TOL_GRAD[dtype])
    torch.testing.assert_close(grad_target, -grad_pred, rtol=0, atol=0)
    return (grad_pred.float() - want.float()).abs().max().item() if want.numel() else 0.0


def check_forced_iters(N, M, dtype, iters, seed):
    """Several tiles per program and several chunks per row, with a ragged tail."""
    pred, target = _inputs((N, M), dtype, seed)
    with torch.no_grad():
        torch.testing.assert_close(sq_err_sum_fwd_triton(pred, target, iters=iters),
                                   sq_err_sum_reference(pred, target), rtol=1e-5, atol=1e-5)
        g_N = torch.randn(N)
        grad_pred, grad_target = sq_err_sum_bwd_triton(pred, target, g_N, need_target_grad=False, iters=iters)
        assert grad_target is None
        torch.testing.assert_close(grad_pred, sq_err_sum_backward_reference(pred, target, g_N), **TOL_GRAD[dtype])


def main() -> int:
    ok, why = triton_status("cpu")
    assert ok, why
    rng = random.Random(0)
    cases = 0
    for dtype in (torch.float32, torch.bfloat16):
        shapes = [(1, 1), (2, 0), (3, BLOCK), (4, BLOCK + 1), (2, 2, 3, 5, 7)]
        shapes += [(rng.randint(1, 4), rng.randint(2, 3 * BLOCK)) for _ in range(4)]  # mostly not multiples
        for i, shape in enumerate(shapes):
            diff = check_autograd(shape, dtype, seed=i)
            print(f"ok autograd {str(dtype):15s} {shape} max|grad diff| {diff:.3g}")
            cases += 1
        for N, M, iters in [(1, 2 * BLOCK * 2 + 17, 2), (3, 4 * BLOCK * 3 - 5, 4)]:
            check_forced_iters(N, M, dtype, iters, seed=N)
            print(f"ok forced-iters {str(dtype):15s} N={N} M={M} ITERS={iters}")
            cases += 1
    # the objective with the kernel plugged in equals its plain-torch default
    pred, target = _inputs((4, 3, 2, 5, 7), torch.float32, 9)
    kernel = lambda p, t: per_sample_sq_err_sum(p, t, backend="triton")  # noqa: E731
    a, b = per_sample_sq_err(pred, target), per_sample_sq_err(pred, target, sq_err_sum_fn=kernel)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(b.sum(), pred), torch.autograd.grad(a.sum(), pred))
    print("ok per_sample_sq_err with the Triton kernel")
    print(f"PASSED {cases + 1} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())

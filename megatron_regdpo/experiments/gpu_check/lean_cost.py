"""What models/wan/lean.py costs and saves, measured piece by piece (it has no switch in the model).

lean.py computes Wan's fp32 elementwise steps (modulated norms, gated residuals, the across-heads q/k RMSNorm,
with RoPE for self-attention) with the same values as the plain code but keeps only model-dtype tensors for
backward. Its effect on a whole step cannot be measured without a switch; what can be measured honestly is
each piece against the plain expression it replaces, at the step's shape ([S, B, D] of one stacked pair):
forward + backward time and the bytes autograd keeps for backward. A block runs: 2 modulated norms, 1 affine
norm (counted as a modulated one), 2 gated residuals, 2 RMSNorms with RoPE (self-attention's q and k), 1
without (cross-attention's q; the context's k is short). Legend: S tokens, B samples, D hidden, H heads, K
head dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_regdpo.models.wan.lean import GatedResidual, modulated_norm
from megatron_regdpo.models.wan.rope_norm import RMSNormAcrossHeads

from .timing import median_seconds

PER_BLOCK = {"modulated_norm": 3, "gated_residual": 2, "rms_norm_rope": 2, "rms_norm_across_heads": 1}
EPS = 1e-6


def _plain_rope(x, rope):
    cos, sin = rope[0], rope[1]
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


def _plain_rms(x, w):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS) * w.float()).to(x.dtype)


class _Norm:
    """FP32LayerNorm without affine parameters, what modulated_norm takes (its eps, no weight or bias)."""
    eps, weight, bias = EPS, None, None

    def __call__(self, x):
        return F.layer_norm(x.float(), (x.shape[-1],), None, None, EPS)


def _pieces(S: int, B: int, H: int, K: int, device, dtype) -> dict:
    """name -> (lean fn, plain fn, inputs)."""
    D = H * K
    rnd = lambda *shape: torch.randn(*shape, device=device).to(dtype).requires_grad_()  # noqa: E731
    norm = _Norm()
    x, branch = rnd(S, B, D), rnd(S, B, D)
    shift, scale, gate = (torch.randn(B, D, device=device).mul(0.1).requires_grad_() for _ in range(3))
    q = rnd(S, B, H, K)
    angles = torch.randn(S, 1, 1, K // 2, device=device)
    rope = torch.stack((angles.cos(), angles.sin()))
    turn = torch.complex(angles.cos(), angles.sin())
    w = (1 + 0.1 * torch.randn(D, device=device)).to(dtype).requires_grad_()
    return {
        "modulated_norm": (lambda x, s, c: modulated_norm(norm, x, s, c),
                           lambda x, s, c: (norm(x) * (1 + c) + s).type_as(x), (x, shift, scale)),
        "gated_residual": (GatedResidual.apply, lambda x, b, g: (x.float() + b.float() * g).to(x.dtype),
                           (x, branch, gate)),
        "rms_norm_rope": (lambda q, w: RMSNormAcrossHeads.apply(q, w, None, D, EPS, None, turn),
                          lambda q, w: _plain_rope(_plain_rms(q.flatten(-2), w).unflatten(-1, (H, K)), rope), (q, w)),
        "rms_norm_across_heads": (lambda x, w: RMSNormAcrossHeads.apply(x, w, None, D, EPS), _plain_rms, (x, w)),
    }


def _saved_bytes(fn, inputs) -> int:
    """Bytes of the distinct storages autograd keeps for fn's backward."""
    from megatron_regdpo.experiments.model_overhead import saved_storages

    with saved_storages() as seen:
        out = fn(*inputs)
    del out
    return sum(seen.values())


def _fwd_bwd_seconds(fn, inputs, device, iters: int) -> float:
    grad = torch.randn_like(fn(*inputs))

    def once():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)
    return median_seconds(once, device, warmup=2, iters=iters)


def lean_cost(S: int, B: int, H: int, K: int, layers: int, device, dtype=torch.bfloat16, iters: int = 5) -> dict:
    rows = []
    for name, (lean, plain, inputs) in _pieces(S, B, H, K, device, dtype).items():
        rows.append({"piece": name, "per_block": PER_BLOCK[name],
                     "lean_ms": 1e3 * _fwd_bwd_seconds(lean, inputs, device, iters),
                     "plain_ms": 1e3 * _fwd_bwd_seconds(plain, inputs, device, iters),
                     "lean_saved_mib": _saved_bytes(lean, inputs) / 2**20,
                     "plain_saved_mib": _saved_bytes(plain, inputs) / 2**20})
    block = {k: sum(r[k] * r["per_block"] for r in rows)
             for k in ("lean_ms", "plain_ms", "lean_saved_mib", "plain_saved_mib")}
    return {"shape_SBHK": [S, B, H, K], "dtype": str(dtype).removeprefix("torch."), "pieces": rows,
            "per_block": block, "layers": layers,
            "model_extra_ms": layers * (block["lean_ms"] - block["plain_ms"]),
            "model_saved_gib": layers * (block["plain_saved_mib"] - block["lean_saved_mib"]) / 1024,
            "note": "pieces alone (inputs counted in the saved bytes); the whole-step effect of lean.py is not "
                    "measured: it has no switch. Under full recompute only the recomputed layer's saved tensors "
                    "matter at once."}

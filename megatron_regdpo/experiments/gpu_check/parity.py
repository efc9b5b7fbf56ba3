"""(b) bf16 parity of our Wan with diffusers' WanTransformer3DModel, on the device.

As tests/unit/test_wan_parity.py does in fp32 on the CPU: a diffusers model with randomised weights (every
tensor non-trivial) is streamed into ours through the conversion rules (models/wan/mapping.py and
checkpoint_io/engine.py). Here the truth is diffusers in fp32 on the device, and the yardstick is
diffusers itself in bf16, as from_pretrained(torch_dtype=bfloat16) loads it (its _keep_in_fp32_modules in
fp32): our bf16 model should be about as far from the fp32 truth as theirs is.
Errors are norm-relative, ||a - b|| / ||b|| in float64, for the output and for every parameter's gradient
(mapped to our names).
"""
from __future__ import annotations

import copy
import gc
from contextlib import contextmanager

import torch

from megatron_regdpo.checkpoint_io.engine import to_ours
from megatron_regdpo.models.wan.build import build_wan
from megatron_regdpo.models.wan.convert import random_inputs
from megatron_regdpo.models.wan.mapping import wan_rules
from megatron_regdpo.parallel.groups import distributed_session

OUT_SLACK, GRAD_SLACK = 2e-3, 1e-2   # ours <= 2 x diffusers-bf16's error + slack


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = b.norm().item()
    return (a - b).norm().item() / scale if scale > 0 else (a - b).norm().item()


@torch.no_grad()
def _randomise_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter non-trivial (zero-initialised ones too), at a scale that keeps activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        scale = 0.1 if p.dim() < 2 else p[0].numel() ** -0.5
        p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))


def _as_loaded(model, dtype):
    """The model as from_pretrained(torch_dtype=dtype) gives it: its _keep_in_fp32_modules stay fp32."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    torch.nn.Module.to(model, dtype)   # ModelMixin.to warns about exactly what is undone next
    for name, module in model.named_modules():
        if keep.intersection(name.split(".")):
            module.float()
    return model


def _grads_ours_names(model, rules, heads: int) -> dict:
    grads = {n: p.grad for n, p in model.named_parameters()}
    return dict(to_ours(rules, grads.__getitem__, heads))


def compare(case, pg, device, dtype=torch.bfloat16, seed: int = 0) -> dict:
    from diffusers import WanTransformer3DModel

    arch = case.arch
    torch.manual_seed(seed)
    truth = WanTransformer3DModel(**arch.diffusers_config()).float()
    _randomise_(truth, seed)
    theirs = _as_loaded(copy.deepcopy(truth), dtype)
    rules = wan_rules(arch)
    ours = build_wan(arch, pg, params_dtype=dtype, backend="local", init_weights=False)
    result = ours.load_state_dict(dict(to_ours(rules, truth.state_dict().__getitem__, arch.num_heads)), strict=False)
    if result.unexpected_keys or any(not k.endswith("_extra_state") for k in result.missing_keys):
        raise RuntimeError(f"conversion left keys: {result.unexpected_keys} {result.missing_keys}")
    truth, theirs, ours = (m.to(device) for m in (truth, theirs, ours))

    x, t, txt, img = (None if v is None else v.to(device)
                      for v in random_inputs(arch, case.batch, case.latent, case.text_len, seed))
    lo = lambda v: None if v is None else v.to(dtype)  # noqa: E731
    out_truth = truth(x, t, txt, encoder_hidden_states_image=img, return_dict=False)[0]
    out_theirs = theirs(lo(x), t, lo(txt), encoder_hidden_states_image=lo(img), return_dict=False)[0]
    out_ours = ours(lo(x), t, lo(txt), lo(img))
    weights = torch.randn(out_truth.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    for out, model in ((out_truth, truth), (out_theirs, theirs), (out_ours, ours)):
        (out.float() * weights).sum().backward()

    g_truth = _grads_ours_names(truth, rules, arch.num_heads)
    g_theirs = _grads_ours_names(theirs, rules, arch.num_heads)
    g_ours = {n: p.grad for n, p in ours.named_parameters()}
    missing = sorted(n for n in g_truth if g_ours.get(n) is None)
    grad_ours = {n: _rel(g_ours[n], g) for n, g in g_truth.items() if n not in missing}
    grad_theirs = {n: _rel(g_theirs[n], g) for n, g in g_truth.items()}
    worst = max(grad_ours, key=grad_ours.get)
    row = {"case": case.name, "layers": arch.num_layers, "hidden": arch.hidden, "batch": case.batch,
           "latent": list(case.latent), "text_len": case.text_len, "params": sum(p.numel() for p in ours.parameters()),
           "out_rel_ours": _rel(out_ours, out_truth), "out_rel_diffusers_bf16": _rel(out_theirs, out_truth),
           "out_rel_ours_vs_diffusers_bf16": _rel(out_ours, out_theirs),
           "grad_rel_max_ours": grad_ours[worst], "grad_worst_param": worst,
           "grad_rel_max_diffusers_bf16": max(grad_theirs.values()), "grads_compared": len(grad_ours)}
    row["ok"] = (not missing and row["out_rel_ours"] <= 2 * row["out_rel_diffusers_bf16"] + OUT_SLACK
                 and row["grad_rel_max_ours"] <= 2 * row["grad_rel_max_diffusers_bf16"] + GRAD_SLACK)
    if missing:
        row["params_without_grad"] = missing
    return row


@contextmanager
def _full_fp32():
    """The fp32 truth in full fp32 on a GPU: no TF32 in cuDNN's convolutions (the patch embedding) or matmuls."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run(ctx) -> dict:
    dev = torch.device(ctx.device)
    rows, failures = [], []
    with distributed_session(world_size=1) as pg, _full_fp32():
        for case in ctx.sizes.parity:
            try:
                row = compare(case, pg, dev)
            except Exception as e:  # noqa: BLE001 - the other case still runs
                rows.append({"case": case.name, "error": f"{type(e).__name__}: {e}"[:1000]})
                failures.append(f"{case.name}: {type(e).__name__}: {e}"[:300])
                continue
            finally:
                gc.collect()
            rows.append(row)
            if not row["ok"]:
                failures.append(f"{case.name}: ours {row['out_rel_ours']:.3g} (output), {row['grad_rel_max_ours']:.3g} "
                                f"(worst gradient, {row['grad_worst_param']}) vs diffusers bf16 "
                                f"{row['out_rel_diffusers_bf16']:.3g}, {row['grad_rel_max_diffusers_bf16']:.3g}")
    return {"dtype": "bfloat16", "truth": "diffusers fp32 on the same device",
            "yardstick": "diffusers bf16 as from_pretrained loads it (_keep_in_fp32_modules in fp32)",
            "criterion": f"ours <= 2 x diffusers-bf16 error + {OUT_SLACK} (output), + {GRAD_SLACK} (worst gradient)",
            "cases": rows, "failures": failures}


def _case_summary(c: dict) -> str:
    if "error" in c:
        return f"{c['case']}: error"
    return (f"{c['case']}: out {c['out_rel_ours']:.2g} (diffusers bf16 {c['out_rel_diffusers_bf16']:.2g}), "
            f"grad max {c['grad_rel_max_ours']:.2g} ({c['grad_rel_max_diffusers_bf16']:.2g})")


def summary(r: dict) -> str:
    return "; ".join(_case_summary(c) for c in r["cases"])

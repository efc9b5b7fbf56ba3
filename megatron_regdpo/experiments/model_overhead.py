"""Our Wan DiT against diffusers' WanTransformer3DModel: time and autograd saved bytes, same weights, same inputs.

Both models are built from one small architecture; diffusers' randomly initialised weights (nudged so that
norm scales and biases are non-trivial) are streamed into ours through the checkpoint conversion rules
(models/wan/mapping.py), so the two compute the same function. Per dtype this measures, in one process:
- forward (inference, no graph) and forward+backward wall time, medians of interleaved repeats (ours and
  diffusers' alternate, so a machine shared with other work slows both alike; the ratio is the figure);
- the bytes autograd keeps for backward (distinct storages, parameters left out: what activation memory
  the model adds per step), and the same with parameters counted. Counted by a saved-tensor hook; ours
  nests hooks of its own (models/wan/lean.py `recomputed_in_backward`), which pass every tensor they do
  not recompute on to this one;
- parity: max relative error against diffusers' model in fp32 of the output and of every parameter's
  gradient (the worst named), for ours and, in bf16, for diffusers' model in bf16 (its rounding alone);
- ours' forward+backward once more with the Python code in place of the fused CPU kernels
  (kernels/wan_cpu; `without_fused_kernels`), interleaved with the rest: what the kernels buy.
Legend: B batch, C latent channels, F/H/W latent frames/height/width, T text tokens, E text width.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kernels import wan_cpu
from megatron_regdpo.checkpoint_io.engine import to_ours
from megatron_regdpo.models.wan.arch import WanArch
from megatron_regdpo.models.wan.build import build_wan
from megatron_regdpo.models.wan.cpu_forms import without_fused_kernels
from megatron_regdpo.models.wan.mapping import wan_rules

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    tokens: int = 320
    batch: int = 2
    text_tokens: int = 64

    def arch(self) -> WanArch:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        return WanArch(num_layers=self.layers, num_heads=self.heads, head_dim=self.hidden // self.heads,
                       ffn_dim=4 * self.hidden)


def latent_grid(tokens: int, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Latent (F, H, W) with F*H*W/prod(patch) == tokens: token grid near a cube, frames the shortest side."""
    def largest_divisor_upto(n, limit):
        return max(d for d in range(1, max(1, int(limit)) + 1) if n % d == 0)
    f = largest_divisor_upto(tokens, round(tokens ** (1 / 3)))
    h = largest_divisor_upto(tokens // f, math.isqrt(tokens // f))
    w = tokens // f // h
    return f * patch[0], h * patch[1], w * patch[2]


def build_models(arch: WanArch, dtype: torch.dtype, pg, seed: int = 0):
    """(ours, diffusers', rules): the same weights in both, cast to dtype, in train mode."""
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging as diffusers_logging

    # diffusers warns that `.to(bf16)` also casts the modules its from_pretrained keeps in fp32; ours casts
    # all of its weights too, and the comparison is of the same weights in the same dtype
    diffusers_logging.set_verbosity_error()
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**arch.diffusers_config()).float()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    rules = wan_rules(arch)
    ours = build_wan(arch, pg, backend="local", params_dtype=torch.float32)
    missing, unexpected = ours.load_state_dict(dict(to_ours(rules, ref.state_dict().__getitem__, arch.num_heads)),
                                               strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return ours.to(dtype).train(), ref.to(dtype).train(), rules


def make_inputs(arch: WanArch, shape: Shape, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    grid = latent_grid(shape.tokens, arch.patch)
    latents = torch.randn(shape.batch, arch.in_channels, *grid, generator=g).to(dtype)
    timestep = torch.rand(shape.batch, generator=g) * 1000
    text = torch.randn(shape.batch, shape.text_tokens, arch.text_dim, generator=g).to(dtype)
    out_grad = torch.randn(shape.batch, arch.out_channels, *grid, generator=g).to(dtype)
    return (latents, timestep, text), out_grad


def _call(model, inputs):
    if type(model).__name__ == "WanTransformer3DModel":
        latents, timestep, text = inputs
        return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
    return model(*inputs)


def _forward(model, inputs):
    with torch.no_grad():
        return _call(model, inputs)


def _forward_backward(model, inputs, out_grad, params=None):
    """One forward and backward from fresh (None) gradients. `params`: the model's parameters, listed once,
    so that walking the module tree (megatron's is deeper than diffusers') is not timed as the model's."""
    for p in params if params is not None else model.parameters():
        p.grad = None
    _call(model, inputs).backward(out_grad)


@contextmanager
def saved_storages():
    """Inside: the distinct storages autograd keeps for backward, {data_ptr: bytes} (filled as they are saved)."""
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages


def saved_bytes(model, inputs) -> dict:
    """Bytes of the distinct storages autograd keeps for backward: without and with the parameters'."""
    with saved_storages() as storages:
        out = _call(model, inputs)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = sum(storages.values())
    activations = sum(n for ptr, n in storages.items() if ptr not in params)
    del out
    return {"activations": activations, "total": total}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def _output_and_grads(model, inputs, out_grad, to_ours_names=None) -> tuple[torch.Tensor, dict]:
    """The output and every parameter's gradient, in our parameter names (`to_ours_names` maps diffusers')."""
    for p in model.parameters():
        p.grad = None
    out = _call(model, inputs)
    out.backward(out_grad)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out.detach(), (to_ours_names(grads) if to_ours_names else grads)


def parity(ours, ref, truth, rules, arch: WanArch, inputs, out_grad) -> dict:
    """Max relative error against `truth` (diffusers' model in fp32, on the fp32 inputs) of our output and
    of every parameter's gradient (the worst named), and the same for diffusers' model in this dtype: in
    bf16 both differ from fp32 by rounding, and ours should not differ more."""
    def renamed(grads):
        return dict(to_ours(rules, grads.__getitem__, arch.num_heads))

    inputs32 = tuple(t.float() for t in inputs)
    want_out, want = _output_and_grads(truth, inputs32, out_grad.float(), renamed)
    row = {}
    for who, model, names in (("", ours, None), ("diffusers_", ref, renamed)):
        out, grads = _output_and_grads(model, inputs, out_grad, names)
        assert set(grads) == set(want), sorted(set(grads) ^ set(want))
        errors = {n: _rel_err(g, want[n]) for n, g in grads.items()}
        worst = max(errors, key=errors.get)
        # all gradients as one vector: the worst single parameter in bf16 is a near-cancelling sum (a q/k
        # norm weight) whose error moves with any change of rounding upstream
        diff2 = sum(float((g.double() - want[n].double()).pow(2).sum()) for n, g in grads.items())
        norm2 = sum(float(want[n].double().pow(2).sum()) for n in grads)
        row.update({f"{who}output_rel_err": _rel_err(out, want_out), f"{who}grad_rel_err": errors[worst],
                    f"{who}grad_rel_err_param": worst, f"{who}grad_rel_err_l2": (diff2 / norm2) ** 0.5})
    return row


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_times(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """name -> seconds of each repeat; each repeat runs every fn once, the order reversed on every other one."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(_seconds(fns[name]))
    return times


def interleaved_medians(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """name -> median seconds (and `name_min`, the fastest repeat), timed by interleaved_times."""
    return _medians(interleaved_times(fns, repeats, warmup))


def _medians(times: dict) -> dict:
    return {**{name: statistics.median(ts) for name, ts in times.items()},
            **{f"{name}_min": min(ts) for name, ts in times.items()}}


def paired_ratio(a: list, b: list) -> float:
    """The median over repeats of a[i] / b[i]: the two runs of a repeat are adjacent in time, so a slow
    stretch of a shared machine (another VM, a burst of page faults) moves both."""
    return statistics.median(x / y for x, y in zip(a, b))


def machine() -> dict:
    import diffusers
    from megatron.core import package_info

    return {"node": platform.node(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "megatron_core": package_info.__version__,
            "diffusers": diffusers.__version__}


def measure(shape: Shape, dtype_name: str, pg, repeats: int, warmup: int = 1) -> dict:
    """One JSONL row: the shape, dtype, medians, ratios (ours / diffusers), saved bytes and parity."""
    arch, dtype = shape.arch(), DTYPES[dtype_name]
    ours, ref, rules = build_models(arch, dtype, pg)
    truth = ref if dtype == torch.float32 else build_models(arch, torch.float32, pg)[1]  # same seed: same weights
    inputs, out_grad = make_inputs(arch, shape, dtype)
    errors = parity(ours, ref, truth, rules, arch, inputs, out_grad)
    del truth
    saved_ours, saved_ref = saved_bytes(ours, inputs), saved_bytes(ref, inputs)
    ours_params, ref_params = list(ours.parameters()), list(ref.parameters())
    times = interleaved_times({
        "ours_fwd": lambda: _forward(ours, inputs), "diffusers_fwd": lambda: _forward(ref, inputs),
        "ours_fwd_bwd": lambda: _forward_backward(ours, inputs, out_grad, ours_params),
        "diffusers_fwd_bwd": lambda: _forward_backward(ref, inputs, out_grad, ref_params),
        "ours_python_fwd_bwd": lambda: _python_steps(_forward_backward, ours, inputs, out_grad, ours_params)},
        repeats, warmup)
    t = _medians(times)
    return {
        "bench": "model_overhead", "dtype": dtype_name, **dataclasses.asdict(shape),
        "latent_FHW": list(latent_grid(shape.tokens, arch.patch)), "repeats": repeats,
        **{f"{k}_s": v for k, v in t.items()},
        "fwd_ratio": t["ours_fwd"] / t["diffusers_fwd"],
        "fwd_bwd_ratio": t["ours_fwd_bwd"] / t["diffusers_fwd_bwd"],
        # the fastest repeat of each: less sensitive than the median to other work on a shared machine
        "fwd_ratio_min": t["ours_fwd_min"] / t["diffusers_fwd_min"],
        "fwd_bwd_ratio_min": t["ours_fwd_bwd_min"] / t["diffusers_fwd_bwd_min"],
        # the median of each repeat's own ratio: the least sensitive to drift (paired_ratio)
        "fwd_ratio_paired": paired_ratio(times["ours_fwd"], times["diffusers_fwd"]),
        "fwd_bwd_ratio_paired": paired_ratio(times["ours_fwd_bwd"], times["diffusers_fwd_bwd"]),
        # the fused CPU kernels: whether they ran (else `ours` is the Python code too) and what they buy
        "cpu_kernels": wan_cpu.status()[1],
        "python_fwd_bwd_ratio_paired": paired_ratio(times["ours_python_fwd_bwd"], times["diffusers_fwd_bwd"]),
        "fused_vs_python_paired": paired_ratio(times["ours_fwd_bwd"], times["ours_python_fwd_bwd"]),
        "ours_saved_bytes": saved_ours["activations"], "diffusers_saved_bytes": saved_ref["activations"],
        "saved_ratio": saved_ours["activations"] / saved_ref["activations"],
        "saved_ratio_with_params": saved_ours["total"] / saved_ref["total"],
        **errors,
        "machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _python_steps(fn, *args):
    with without_fused_kernels():
        return fn(*args)


def markdown(rows: list[dict]) -> str:
    lines = ["| dtype | fwd ours / diffusers (ms) | ratio (paired) | fwd+bwd ours / diffusers (ms) | ratio (paired) | "
             "fwd+bwd ratio, Python steps (paired) | saved MiB ours / diffusers | ratio | out rel err ours / "
             "diffusers | grad rel err ours / diffusers (worst parameter; all as one vector) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {1e3 * r['ours_fwd_s']:.1f} / {1e3 * r['diffusers_fwd_s']:.1f} | {r['fwd_ratio']:.2f} "
            f"({r['fwd_ratio_paired']:.2f}) | {1e3 * r['ours_fwd_bwd_s']:.1f} / {1e3 * r['diffusers_fwd_bwd_s']:.1f} | "
            f"{r['fwd_bwd_ratio']:.2f} ({r['fwd_bwd_ratio_paired']:.2f}) | {r['python_fwd_bwd_ratio_paired']:.2f} | "
            f"{r['ours_saved_bytes'] / 2**20:.1f} / {r['diffusers_saved_bytes'] / 2**20:.1f} | "
            f"{r['saved_ratio']:.2f} | {r['output_rel_err']:.1e} / {r['diffusers_output_rel_err']:.1e} | "
            f"{r['grad_rel_err']:.1e} / {r['diffusers_grad_rel_err']:.1e}; "
            f"{r['grad_rel_err_l2']:.1e} / {r['diffusers_grad_rel_err_l2']:.1e} |")
    return "\n".join(lines)

"""kernels/wan_cpu: the Wan block's fused CPU kernels against their reference, the Python code of
models/wan/lean.py, rope_norm.py and gelu.py (`without_fused_kernels`), at the block's real layouts: values and gradients equal
to rounding, recomputes bitwise their forwards, results deterministic, bad input refused by name, and the Python
path taken where the kernels do not apply (GPU forms, tensor subclasses, disabled)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_regdpo.models.wan import lean, rope_norm
from megatron_regdpo.models.wan.cpu_forms import fused_kernels, kernels_as_on_gpu, without_fused_kernels
from megatron_regdpo.models.wan.gelu import gelu_and_recompute

ROOT = Path(__file__).resolve().parents[2]
S, B, H, K = 24, 3, 4, 16
D = H * K
TOL = {torch.float32: {"rtol": 2e-5, "atol": 2e-6}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


@pytest.fixture(autouse=True)
def calls(fused_cpu_kernels, monkeypatch):
    """Counts of each kernel's calls in the test (a silent fallback to Python would leave one at 0)."""
    counts = {}
    for name, op in list(vars(fused_cpu_kernels).items()):
        def counted(*args, _op=op, _name=name):
            counts[_name] = counts.get(_name, 0) + 1
            return _op(*args)
        monkeypatch.setattr(fused_cpu_kernels, name, counted)
    return counts


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


def _run(fn, inputs, grad):
    """fn's output and its inputs' gradients, on the fused path and on the Python path."""
    out = {}
    for name in ("fused", "python"):
        xs = [_leaf(t) if t.requires_grad else t for t in inputs]
        if name == "python":
            with without_fused_kernels():
                y = fn(*xs)
        else:
            y = fn(*xs)
        y.backward(grad)
        out[name] = (y.detach(), [x.grad for x in xs if x.requires_grad])
    return out


def _close(out, dtype, forward_bitwise=False):
    (yf, gf), (yp, gp) = out["fused"], out["python"]
    assert yf.dtype == yp.dtype and yf.shape == yp.shape
    if forward_bitwise:
        assert torch.equal(yf, yp)
    else:   # a sum in another order: the fp32 value to rounding, so in bf16 at most one rounding step apart
        torch.testing.assert_close(yf, yp, rtol=0, atol=2 * torch.finfo(dtype).eps * yp.abs().max().item())
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, **TOL[dtype])


def _per_sample():
    """shift, scale, gate as the block has them: [B, D] views of one [B, 6, D] fp32 table (strided)."""
    mod = (0.1 * torch.randn(B, 6, D)).transpose(0, 1)
    return [_leaf(t) for t in mod.unbind(0)[:3]]


def _rope():
    angles = torch.randn(S, 1, 1, K // 2)
    return torch.complex(angles.cos(), angles.sin())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_step_equals_the_python_code(dtype, threads, calls, fused_cpu_kernels):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, branch = _leaf(torch.randn(S, B, D), dtype), _leaf(torch.randn(S, B, D), dtype)
        shift, scale, gate = _per_sample()
        g = torch.randn(S, B, D).to(dtype)
        norm = torch.nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        _close(_run(lambda x, s, c: lean.modulated_norm(norm, x, s, c), [x, shift, scale], g), dtype)
        affine = torch.nn.LayerNorm(D, eps=1e-6)
        with torch.no_grad():
            affine.weight.add_(0.1 * torch.randn(D)), affine.bias.add_(0.1 * torch.randn(D))
        w, b = _leaf(affine.weight), _leaf(affine.bias)
        _close(_run(lambda x, w, b: lean.Fp32LayerNorm.apply(x, 1e-6, w, b, None, None), [x, w, b], g), dtype)
        _close(_run(lean.GatedResidual.apply, [x, branch, gate], g), dtype, forward_bitwise=True)
        # q and k: a head's strided slice of the fused [S, B, H * 3K] projection, then RoPE
        qkv = _leaf(torch.randn(S, B, 3 * D), dtype)
        wq = _leaf(1 + 0.1 * torch.randn(D), dtype)
        gq = torch.randn(B, H, S, K).to(dtype).permute(2, 0, 1, 3)   # as attention's backward hands it over
        for turn in (_rope(), None):
            def qk_norm(qkv, wq, turn=turn):
                q = qkv.unflatten(-1, (H, 3 * K))[..., K:2 * K]
                return rope_norm.RMSNormAcrossHeads.apply(q, wq, None, D, 1e-6, None, turn)
            _close(_run(qk_norm, [qkv, wq], gq), dtype)
        pre = _leaf(3 * torch.randn(S, B, 4 * D), dtype)
        _close(_run(lambda p: gelu_and_recompute(p)[0], [pre], torch.randn(S, B, 4 * D).to(dtype)), dtype)
        tp_only = {"rms_backward_dot", "rms_backward_dx"}   # under TP (test_tp_pieces_equal_the_one_pass_backward)
        assert set(calls) == set(vars(fused_cpu_kernels)) - tp_only, calls   # every other kernel ran
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputes_are_bitwise_their_forwards_and_runs_repeat_bitwise(dtype):
    x = _leaf(torch.randn(S, B, D), dtype)
    affine = torch.nn.LayerNorm(D, eps=1e-6)
    y = lean.norm_only(affine, x)
    assert torch.equal(lean.normed(affine, x), y)
    qkv = torch.randn(S, B, 3 * D).to(dtype).unflatten(-1, (H, 3 * K))
    q, wq, turn, stats = qkv[..., :K].requires_grad_(False), _leaf(1 + 0.1 * torch.randn(D), dtype), _rope(), []
    yq = rope_norm.RMSNormAcrossHeads.apply(q, wq, None, D, 1e-6, stats, turn)
    assert torch.equal(rope_norm.rms_output(q, stats[0], wq, turn), yq)
    pre = _leaf(torch.randn(S, B, 4 * D), dtype)
    act, redo = gelu_and_recompute(pre)
    assert torch.equal(redo(), act)
    # reductions split over threads in a fixed way: the same inputs give the same bits
    shift, scale, _ = _per_sample()
    grads = []
    for _ in range(2):
        xs = _leaf(x)
        lean.modulated_norm(torch.nn.LayerNorm(D, elementwise_affine=False), xs, shift, scale).sum().backward()
        grads.append(xs.grad)
    assert torch.equal(*grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tp_pieces_equal_the_one_pass_backward(dtype, fused_cpu_kernels):
    """Under TP the q/k norm's backward runs in two kernels around the all-reduce of each row's dot (the
    distributed parity tests run them against one rank); with nothing to reduce they are the one-pass
    backward, bitwise."""
    k = fused_cpu_kernels
    x = torch.randn(S, B, 3 * D).to(dtype).unflatten(-1, (H, 3 * K))[..., :K]
    grad = torch.randn(B, H, S, K).to(dtype).permute(2, 0, 1, 3)
    rs = torch.rand(S, B, 1, 1) + 0.5
    w = 1 + 0.1 * torch.randn(D)
    for turn in (torch.view_as_real(_rope()).reshape(S, K), None):
        dx, dw = k.rms_backward(grad, x, rs, w, turn, True, -1.0 / D)
        dot, dw2 = k.rms_backward_dot(grad, x, rs, w, turn, True)
        assert torch.equal(k.rms_backward_dx(grad, x, rs, w, turn, dot, -1.0 / D), dx) and torch.equal(dw2, dw)


def test_bad_input_is_refused_by_name(fused_cpu_kernels):
    k = fused_cpu_kernels
    x = torch.randn(S, B, D)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        k.layer_norm_forward(x.transpose(0, 1), 1e-6, None, None, None, None)
    with pytest.raises(RuntimeError, match="scale must be fp32"):
        k.layer_norm_forward(x, 1e-6, None, None, torch.zeros(B, D), torch.zeros(B, D, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="turn must be contiguous"):
        k.rms_apply(x.view(S, B, H, K), torch.ones(S, B, 1, 1), torch.ones(D), torch.ones(S, K + 2))
    with pytest.raises(RuntimeError, match="grad and x must be contiguous"):
        k.gelu_backward(torch.randn(S, D).t(), torch.randn(D, S))


def test_where_the_kernels_do_not_apply_the_python_code_runs():
    x = torch.randn(S, B, D)
    assert fused_kernels(x) is not None
    with kernels_as_on_gpu():            # the capacity planner's simulated GPU step
        assert fused_kernels(x) is None
    with without_fused_kernels():
        assert fused_kernels(x) is None
    assert fused_kernels(torch.nn.Parameter(x)) is None   # a tensor subclass: torch's own dispatch
    assert fused_kernels(x.to("meta")) is None


def test_disabled_kernels_leave_the_python_path():
    """REGDPO_DISABLE_CPU_KERNELS=1: nothing is built, status says why, the block's steps still run."""
    code = ("from kernels import wan_cpu; import torch\n"
            "from megatron_regdpo.models.wan import lean\n"
            "print(wan_cpu.status()); assert wan_cpu.ops() is None\n"
            "x = torch.randn(4, 2, 8, requires_grad=True)\n"
            "y = lean.GatedResidual.apply(x, x * 2, torch.ones(2, 8)); y.sum().backward()\n"
            "assert torch.equal(x.grad, torch.full_like(x, 3.0)); print('ok')\n")
    env = {**os.environ, "REGDPO_DISABLE_CPU_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(False, 'disabled by REGDPO_DISABLE_CPU_KERNELS')" in out.stdout and out.stdout.strip().endswith("ok")

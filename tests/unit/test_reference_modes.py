"""The four reference modes give the resident copy's errors on the same batches, keep no autograd graph,
and the cached mode refuses keys and settings it was not computed for.

The policy is a LoRA'd Wan (adapters non-zero, so policy != reference); the reference is its base. The
cached mode reads a cache written by tools/precompute_reference.py (its main(), in-process) from a
distributed checkpoint of that base.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from megatron_regdpo.checkpoint_io.megatron_ckpt import save_model
from megatron_regdpo.models.lora import apply_lora, is_lora_param, lora_modules
from megatron_regdpo.models.wan.arch import SIZES
from megatron_regdpo.models.wan.build import build_wan
from megatron_regdpo.models.wan.convert import FAMILY
from megatron_regdpo.objectives.flow_matching import FlowMatchingSettings
from megatron_regdpo.reference import (CpuSwapReference, PairLatents, ReferenceCache, build_reference, model_errors,
                                       reference_batch)

ARCH = SIZES["debug"]
LATENT, TEXT_LEN, PAIRS, SEED, STEP = (3, 4, 8), 7, 3, 11, 0
SETTINGS = FlowMatchingSettings(shift=3.0)


def _pairs() -> list[PairLatents]:
    g = torch.Generator().manual_seed(5)
    return [PairLatents(pair_id=100 + i, x0_w=torch.randn(16, *LATENT, generator=g),
                        x0_l=torch.randn(16, *LATENT, generator=g),
                        text=torch.randn(TEXT_LEN, ARCH.text_dim, generator=g)) for i in range(PAIRS)]


def _batches(draw: int = 0):
    return [reference_batch([p], seed=SEED, step=STEP, draw=draw, settings=SETTINGS) for p in _pairs()]


def _base_model(pg):
    torch.manual_seed(0)
    model = build_wan(ARCH, pg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def setup(pg, tmp_path_factory):
    """A LoRA policy, a base checkpoint, a pair bundle and a cache written by the tool."""
    tmp = tmp_path_factory.mktemp("ref")
    base = _base_model(pg)
    save_model(base, tmp / "base", {"family": FAMILY, "arch": dataclasses.asdict(ARCH), "dtype": "torch.float32"})
    policy = apply_lora(_base_model(pg), rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for _, m in lora_modules(policy):
            m.lora_B.copy_(0.2 * torch.randn(m.lora_B.shape, generator=g))
    pairs = _pairs()
    torch.save({"pair_id": torch.tensor([p.pair_id for p in pairs]), "x0_w": torch.stack([p.x0_w for p in pairs]),
                "x0_l": torch.stack([p.x0_l for p in pairs]), "text": torch.stack([p.text for p in pairs])},
               tmp / "pairs.pt")
    tool = _tool()
    rc = tool.main(["--checkpoint", str(tmp / "base"), "--pairs", str(tmp / "pairs.pt"),
                    "--out", str(tmp / "store" / "reference_cache"), "--seed", str(SEED), "--step", str(STEP),
                    "--draws", "2", "--shift", str(SETTINGS.shift)])
    assert rc == 0
    resident = build_reference("resident", policy, build_model=lambda: build_wan(ARCH, pg, init_weights=False))
    return {"policy": policy, "tmp": tmp, "cache": tmp / "store" / "reference_cache", "resident": resident,
            "want": [resident(b) for b in _batches()]}


def _tool():
    path = Path(__file__).resolve().parents[2] / "tools" / "precompute_reference.py"
    spec = importlib.util.spec_from_file_location("precompute_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("precompute_reference", module)
    spec.loader.exec_module(module)
    return module


def _build(mode, setup, pg):
    return build_reference(mode, setup["policy"], build_model=lambda: build_wan(ARCH, pg, init_weights=False),
                           cache_path=setup["cache"],
                           expect={"flow_matching": SETTINGS,
                                   "model": {"checkpoint": str((setup["tmp"] / "base").resolve())}})


@pytest.mark.parametrize("mode", ["lora_base", "resident", "cpu_swap", "cached"])
def test_modes_agree_with_resident(mode, setup, pg):
    ref = _build(mode, setup, pg)
    ref.begin_step()
    got = [ref(b) for b in _batches()]
    ref.end_step()
    for (w, l), (want_w, want_l) in zip(got, setup["want"]):
        assert w.shape == (1,) and l.shape == (1,)
        assert torch.equal(w, want_w) and torch.equal(l, want_l), (mode, w, want_w, l, want_l)
        for err in (w, l):
            assert not err.requires_grad and err.grad_fn is None


def test_reference_differs_from_policy_and_keeps_no_graph(setup, pg):
    """The policy (adapters on) disagrees with the reference; a DPO-like loss through both leaves gradients on
    the policy's adapters only, none on any reference or base weight."""
    policy = setup["policy"]
    for mode in ("lora_base", "resident"):
        ref = _build(mode, setup, pg)
        batch = _batches()[0]
        err_w, err_l = ref(batch)
        pol = model_errors(policy, batch)
        assert abs(pol[0].item() - err_w.item()) > 1e-6
        loss = (pol[0] - err_w) - (pol[1] - err_l)
        loss.backward()
        for name, p in policy.named_parameters():
            assert (p.grad is not None) == is_lora_param(name), name
        if mode == "resident":
            assert all(p.grad is None and not p.requires_grad for p in ref.model.parameters())
        policy.zero_grad(set_to_none=True)


def test_cpu_swap_moves_weights_once_per_step(setup, pg):
    ref = _build("cpu_swap", setup, pg)
    assert isinstance(ref, CpuSwapReference)
    params = list(ref.model.parameters())
    assert ref.io_bytes_per_step == sum(h.numel() * h.element_size() for h in ref._host)
    assert ref.io_bytes_per_step == sum(v.numel() * v.element_size() for k, v in setup["policy"].state_dict().items()
                                        if torch.is_tensor(v) and not is_lora_param(k))
    assert all(p.numel() == 0 for p in params)  # swapped out between steps
    with pytest.raises(RuntimeError, match="begin_step"):
        ref(_batches()[0])
    ref.begin_step()
    assert all(p.numel() > 0 for p in params)
    ref.end_step()
    assert all(p.numel() == 0 for p in params)


def test_cached_mode_names_mismatched_keys(setup):
    cache = ReferenceCache(setup["cache"])
    assert len(cache) == 2 * PAIRS
    w, l = cache.lookup([100, 102], seed=SEED, step=STEP, draw=1)
    assert w.shape == (2,) and w.dtype == torch.float32
    # the tool computed draw 1 with draw-1 noise: it matches the resident reference on draw-1 batches
    want = setup["resident"](_batches(draw=1)[2])
    assert torch.equal(w[1:], want[0]) and torch.equal(l[1:], want[1])
    # a cached run draws its noise with the cache's step key and one draw per epoch
    assert _build("cached", setup, None).noise_key(step=37, epoch=1) == (STEP, 1)
    assert setup["resident"].noise_key(step=37, epoch=1) == (37, 0)
    with pytest.raises(KeyError, match="pair_id=999"):
        cache.lookup([100, 999], seed=SEED, step=STEP, draw=0)
    with pytest.raises(KeyError, match=r"draw\(s\) \[0, 1\], not draw 5"):
        cache.lookup([101], seed=SEED, step=STEP, draw=5)
    with pytest.raises(ValueError, match="seed 12"):
        cache.lookup([101], seed=SEED + 1, step=STEP, draw=0)
    with pytest.raises(ValueError, match="step 3"):
        cache.lookup([101], seed=SEED, step=3, draw=0)
    with pytest.raises(ValueError, match="flow_matching.shift"):
        ReferenceCache(setup["cache"], {"flow_matching": FlowMatchingSettings(shift=5.0)})
    with pytest.raises(ValueError, match="model.checkpoint"):
        ReferenceCache(setup["cache"], {"model": {"checkpoint": "/elsewhere"}})


def test_build_reference_rejects_bad_requests(setup, pg):
    with pytest.raises(ValueError, match="unknown objective.reference.mode"):
        build_reference("frozen", setup["policy"])
    with pytest.raises(ValueError, match="LoRA"):
        build_reference("lora_base", _base_model(pg))
    with pytest.raises(ValueError, match="build_model"):
        build_reference("resident", setup["policy"])
    with pytest.raises(FileNotFoundError):
        build_reference("cached", cache_path=setup["tmp"] / "nope")



def test_reference_pass_brackets_cpu_swap(setup, pg):
    """training.step.reference_pass (the trainer's step, its evaluation and the capacity planner) copies the
    cpu_swap weights in for the pass and drops them after: evaluation after a step used to find them gone."""
    from megatron_regdpo.training.step import reference_pass

    ref = _build("cpu_swap", setup, pg)
    ref.end_step()
    mbs = [{"batch": b} for b in _batches()]
    reference_pass(ref, mbs, lambda mb: mb["batch"])
    assert not ref.swapped_in
    for mb, (want_w, want_l) in zip(mbs, setup["want"]):
        torch.testing.assert_close(mb["err_ref_w"], want_w)
        torch.testing.assert_close(mb["err_ref_l"], want_l)


@pytest.mark.parametrize("mode", ["lora_base", "resident", "cpu_swap"])
def test_pass_through_the_schedule_gives_the_calls_errors(mode, setup, pg, monkeypatch):
    """The pipelined reference pass (a forward-only pass of the reference's stage through megatron-core's
    schedule, as under pipeline parallelism; here the one-stage schedule) hands each micro-batch, in order,
    bitwise the errors a call computes. tests/distributed/test_pipeline_references.py runs it at PP2."""
    from megatron_regdpo.training.step import reference_pass

    ref = _build(mode, setup, pg)
    assert not ref.pipelined() and ref.stage is not None  # the whole model on this rank: one call per micro-batch
    monkeypatch.setattr(ref, "pipelined", lambda: True)
    mbs = [{"batch": b} for b in _batches()]
    reference_pass(ref, mbs, lambda mb: mb["batch"])
    for mb, (want_w, want_l) in zip(mbs, setup["want"]):
        assert torch.equal(mb["err_ref_w"], want_w) and torch.equal(mb["err_ref_l"], want_l), mode
        assert mb["err_ref_w"].grad_fn is None
    if mode == "lora_base":  # the adapters are back on after the pass
        assert all(m.lora_enabled for _, m in lora_modules(setup["policy"]))
    if mode == "cpu_swap":
        assert not ref.swapped_in
        with pytest.raises(RuntimeError, match="begin_step"):
            ref.stage_context()
    assert not _build("cached", setup, pg).pipelined()  # looked up on every rank, whatever the layout

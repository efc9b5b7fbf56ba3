"""LoRA under tensor (and sequence) parallelism computes what one rank computes.

Two spawned gloo ranks run TP2, PP2, TP2+SP and I2V TP2+SP with adapters on every linear (B non-zero, so A
gets gradients too): outputs, per-sample errors and every adapter gradient (gathered to full shape, after
megatron-core's finalize_model_grads) equal the world-1 run, no base weight gets a gradient, and the
adapters' initial A is the same in every layout. Checkpoints
cross layouts both ways: TP1 -> TP2 and TP2 -> TP1, with equal outputs.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from _cases import ARCHS, BETA, PAIRS, SFT, TOKENS, _global_names, _shard, _unshard, make_payload
from _harness import run_world

pytestmark = pytest.mark.distributed
RTOL = 1e-5
RANK, ALPHA = 4, 8.0

WORLD2 = {
    "TP2": {"tp": 2},
    "PP2": {"pp": 2},  # adapters keyed and initialised by global layer; frozen conditioning on every stage
    "TP2+SP": {"tp": 2, "sp": True},
    "I2V-TP2+SP": {"tp": 2, "sp": True, "task": "i2v"},
}


def _with_adapters(payload: dict, seed: int) -> dict:
    """The payload's base weights plus full-size adapters (non-zero B), keyed like a TP1 model's state."""
    from megatron_regdpo.models.lora import apply_lora, lora_modules
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.parallel.groups import init_distributed

    model = build_wan(ARCHS[payload["task"]], init_distributed(), init_weights=False)
    apply_lora(model, RANK, ALPHA, seed=seed)
    g = torch.Generator().manual_seed(seed)
    weights = dict(payload["weights"])
    for name, m in lora_modules(model):
        weights[f"{name}.lora_A"] = m.lora_A.detach().clone()
        weights[f"{name}.lora_B"] = 0.2 * torch.randn(m.lora_B.shape, generator=g)
    return {**payload, "weights": weights}


def lora_case(layout: dict, payload: dict) -> dict:
    from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model, save_model
    from megatron_regdpo.models.lora import apply_lora, is_lora_param
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.objectives.per_sample import per_sample_sq_err
    from megatron_regdpo.parallel.data_parallel import wrap_data_parallel
    from megatron_regdpo.parallel.groups import init_distributed
    from megatron_regdpo.parallel.pipeline import forward_backward

    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    par = SimpleNamespace(tp=tp, pp=pp, cp=1, sequence_parallel=layout.get("sp", False), virtual_pp=None,
                          distributed_optimizer=False, fsdp=False, grad_reduce_in_fp32=False)
    pg = init_distributed(tp, pp, 1)
    model = apply_lora(build_wan(ARCHS[payload["task"]], pg, parallel=par, init_weights=False), RANK, ALPHA, seed=1)
    names = _global_names(model)
    init_a = {names[n]: _unshard(p, p, pg.tp) for n, p in model.named_parameters() if n.endswith(".lora_A")}
    if layout.get("load"):
        load_model(model, layout["load"])
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(_shard(payload["weights"][names[name]], p, pg.tp))
    if layout.get("save"):
        save_model(model, layout["save"], {})
    ddp = wrap_data_parallel(model, par, pg)
    outputs, errs = {}, {}

    def forward_step(data_iterator, chunk):
        pair = next(data_iterator)
        b = payload["pairs"][pair]
        out = model.forward_tokens(b["x"], b["t"], b["text"], b["image"])

        def loss_func(out_BSP):
            err = per_sample_sq_err(out_BSP, model.patchify(b["target"]))
            outputs[pair] = model.unpatchify(out_BSP.detach(), model.token_grid(b["x"].shape))
            errs[pair] = err.detach()
            loss = -F.logsigmoid(-BETA * (err[0] - err[1])) + SFT * err[0]
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    forward_backward([ddp], forward_step, iter(range(PAIRS)), num_microbatches=PAIRS, tokens=TOKENS,
                     micro_batch_size=2, pg_collection=pg)
    frozen_with_grad = [n for n, p in model.named_parameters()
                        if not is_lora_param(n) and (p.grad is not None or getattr(p, "main_grad", None) is not None)]
    return {"outputs": outputs, "errs": errs, "frozen_with_grad": frozen_with_grad, "init_a": init_a,
            "grads": {names[n]: _unshard(p.main_grad, p, pg.tp) for n, p in model.named_parameters()
                      if is_lora_param(n)}}


def run_lora_cases(rank: int, world: int, payload: dict) -> list:
    from megatron_regdpo.parallel.groups import destroy_distributed, init_distributed

    init_distributed(rank=rank, world_size=world)
    try:
        return [lora_case(layout, payload[layout.get("task", "t2v")]) for layout in payload["layouts"]]
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def payloads(pg):
    return {task: _with_adapters(make_payload(task), seed=3) for task in ("t2v", "i2v")}


@pytest.fixture(scope="module")
def references(payloads, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("lora_ckpt")
    refs = {task: lora_case({"task": task}, p) for task, p in payloads.items()}
    lora_case({"save": str(ckpt / "tp1")}, payloads["t2v"])
    return refs, ckpt


@pytest.fixture(scope="module")
def world2(payloads, references):
    _, ckpt = references
    cases = {**WORLD2, "load@TP2<-TP1": {"tp": 2, "load": str(ckpt / "tp1")}}
    cases["TP2+SP"] = {**cases["TP2+SP"], "save": str(ckpt / "tp2")}  # saved before its step: the TP1 weights
    per_rank = run_world(2, run_lora_cases, {**payloads, "layouts": list(cases.values())})
    return {name: [rank[i] for rank in per_rank] for i, name in enumerate(cases)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _check_outputs(ranks: list, ref: dict) -> None:
    """Every rank's outputs match (pipeline stages before the last have none); together they cover all pairs."""
    for r in ranks:
        for pair, out in r["outputs"].items():
            assert _rel(out, ref["outputs"][pair]) < RTOL, f"output of pair {pair}"
            assert _rel(r["errs"][pair], ref["errs"][pair]) < RTOL, f"errors of pair {pair}"
    assert set().union(*(r["outputs"] for r in ranks)) == set(ref["outputs"])


@pytest.mark.parametrize("name", list(WORLD2))
def test_lora_tp_matches_single_rank(name, world2, references):
    refs, _ = references
    ref = refs[WORLD2[name].get("task", "t2v")]
    assert ref["grads"] and not ref["frozen_with_grad"]
    ranks = world2[name]
    _check_outputs(ranks, ref)
    for r in ranks:
        assert not r["frozen_with_grad"], r["frozen_with_grad"][:4]
        for n, g in r["grads"].items():
            assert g.shape == ref["grads"][n].shape, n
            assert ref["grads"][n].abs().max() > 0, n
            assert _rel(g, ref["grads"][n]) < RTOL, f"grad of {n}: {_rel(g, ref['grads'][n]):.2e}"
    assert set().union(*(r["grads"] for r in ranks)) == set(ref["grads"])
    for r in ranks:  # apply_lora's A is the same for every layout (drawn at full size per global layer)
        for n, a in r["init_a"].items():
            assert torch.equal(a, ref["init_a"][n]), n


def test_checkpoint_tp1_loads_at_tp2(world2, references):
    refs, _ = references
    _check_outputs(world2["load@TP2<-TP1"], refs["t2v"])


def test_checkpoint_tp2_loads_at_tp1(world2, payloads, references):
    refs, ckpt = references
    back = lora_case({"load": str(ckpt / "tp2")}, payloads["t2v"])
    _check_outputs([back], refs["t2v"])
    for n, g in back["grads"].items():
        assert _rel(g, refs["t2v"]["grads"][n]) < RTOL, n

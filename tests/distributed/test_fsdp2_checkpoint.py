"""FSDP2 state in training checkpoints and in the references.

- A checkpoint saved by the Checkpointer under FSDP2 at DP2 (after two AdamW steps) resumes under FSDP2 at
  DP4 and at TP2 x DP2 (+SP), and without FSDP on one rank: weights and optimizer state resharded; the next
  step's loss and parameters equal the uninterrupted DP2 run's (fp32, 1e-5). Its weights load into a plain
  one-rank model. A DDP checkpoint resumes under FSDP2 the same way.
- bf16 (fp32 master weights): FSDP2 writes megatron-core's mixed-precision layout, so its checkpoint loads into
  megatron's optimizer and the other way round with the master weights, moments and step bitwise equal.
- The `resident` reference under FSDP2 is sharded like the policy (half the elements per rank at DP2), from
  the policy's weights or from a base checkpoint, and gives one rank's reference errors; so does `lora_base`.
- Extra state (a te model's FP8 scaling metadata; here SDPA carrying extra state the way a TE module does, as
  in tests/unit/test_checkpoint_extra_state.py) round-trips through an FSDP2 training checkpoint at DP2, and
  through `load_model`; a checkpoint without it (the local backend's) leaves the model's own in place.
"""
from __future__ import annotations

import pytest
import torch

from _cases import ARCHS, make_payload
from _fsdp_cases import OPTIM, reference_errors_case, run_fsdp_cases
from _harness import run_world

pytestmark = pytest.mark.distributed
RTOL = 1e-5


@pytest.fixture(scope="module")
def payload(pg):
    return {"t2v": make_payload("t2v")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, payload):
    """A base checkpoint of the payload's weights (one rank, plain model) for the resident reference."""
    from _cases import run_case

    root = tmp_path_factory.mktemp("fsdp2_ckpt")
    run_case({"task": "t2v", "save": str(root / "base")}, payload["t2v"])
    return root


@pytest.fixture(scope="module")
def world2(payload, folders):
    layouts = [{"fsdp": True, "save_at": 2, "save_dir": str(folders / "dp2")},
               {"case": "reference", "mode": "resident", "fsdp": True},
               {"case": "reference", "mode": "resident", "fsdp": True, "checkpoint": str(folders / "base")},
               {"case": "reference", "mode": "lora_base", "fsdp": True, "lora": True},
               {"save_at": 2, "save_dir": str(folders / "ddp_dp2")},
               {"fsdp": True, "bf16": True, "save_at": 2, "save_dir": str(folders / "fsdp_bf16")},
               {"bf16": True, "save_at": 2, "save_dir": str(folders / "ddp_bf16")},
               {"fsdp": True, "bf16": True, "resume": str(folders / "ddp_bf16")}]
    per_rank = run_world(2, run_fsdp_cases, {**payload, "layouts": layouts})
    return [[rank[i] for rank in per_rank] for i in range(len(layouts))]


@pytest.fixture(scope="module")
def world4(payload, folders, world2):
    layouts = [{"fsdp": True, "resume": str(folders / "dp2")},
               {"fsdp": True, "tp": 2, "sp": True, "resume": str(folders / "dp2")},
               {"fsdp": True, "resume": str(folders / "ddp_dp2")}]
    per_rank = run_world(4, run_fsdp_cases, {**payload, "layouts": layouts})
    return [[rank[i] for rank in per_rank] for i in range(len(layouts))]


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _resumed_equals(ranks: list, uninterrupted: dict, name: str) -> None:
    assert len(uninterrupted["losses"]) == 3
    for r in ranks:
        assert r["resumed_step"] == 2
        (loss,) = r["losses"]
        assert abs(loss - uninterrupted["losses"][2]) <= RTOL * abs(uninterrupted["losses"][2]), (name, r["coords"])
        for key, p in r["params"].items():
            assert _rel(p, uninterrupted["params"][key]) < RTOL, f"{name}: {key} after the resumed step"


@pytest.mark.parametrize("index, name", [(0, "FSDP2 DP2 -> FSDP2 DP4"), (1, "FSDP2 DP2 -> FSDP2 TP2xDP2+SP"),
                                         (2, "DDP DP2 -> FSDP2 DP4")])
def test_dp2_checkpoint_resumes_under_fsdp2(index, name, world2, world4):
    _resumed_equals(world4[index], world2[4 if index == 2 else 0][0], name)


def test_fsdp2_checkpoint_resumes_without_fsdp(world2, folders, payload):
    from _fsdp_cases import run_resume_case

    one = run_resume_case({"resume": str(folders / "dp2")}, payload["t2v"])
    _resumed_equals([one], world2[0][0], "FSDP2 DP2 -> one rank without FSDP")


def _same_state(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for name, fields in want.items():
        for field, value in fields.items():
            g = got[name][field]
            assert g == value if field == "step" else torch.equal(g, value), f"{what}: {field} of {name}"


def test_bf16_fsdp2_checkpoint_loads_into_megatron_optimizer(world2, folders, payload):
    from _fsdp_cases import run_resume_case

    one = run_resume_case({"bf16": True, "resume": str(folders / "fsdp_bf16")}, payload["t2v"])
    _same_state(one["loaded_state"], world2[5][0]["saved_state"], "FSDP2 bf16 -> megatron bf16")


def test_bf16_megatron_checkpoint_loads_into_fsdp2(world2):
    for r in world2[7]:
        _same_state(r["loaded_state"], world2[6][0]["saved_state"], "megatron bf16 -> FSDP2 bf16")


def test_fsdp2_checkpoint_weights_load_without_fsdp(world2, folders, pg):
    """The checkpoint's keys are the model's: a plain one-rank model reads the FSDP2 shards back whole."""
    from _cases import ARCHS, _global_names

    from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model
    from megatron_regdpo.models.wan.build import build_wan

    model = build_wan(ARCHS["t2v"], pg, init_weights=False)
    load_model(model, folders / "dp2" / "iter_0000002")
    names, saved = _global_names(model), world2[0][0]["saved_params"]
    loaded = {names[n]: p.detach() for n, p in model.named_parameters()}
    assert set(loaded) == set(saved)
    for key, p in loaded.items():
        assert torch.equal(p, saved[key]), key


@pytest.mark.parametrize("index", [1, 2, 3])
def test_fsdp2_references_match_one_rank(index, world2, payload):
    layout = world2[index][0]["layout"]
    one = reference_errors_case({k: v for k, v in layout.items() if k not in ("fsdp", "checkpoint")}, payload["t2v"])
    for r in world2[index]:
        for pair, errs in r["errs"].items():
            assert _rel(errs, one["errs"][pair]) < RTOL, f"{layout['mode']} reference error of pair {pair}"
        if layout["mode"] == "resident":  # sharded over the two ranks
            assert r["ref_numel"] <= 0.55 * one["ref_numel"], (r["ref_numel"], one["ref_numel"])


# ---- extra state (TE's FP8 metadata) through FSDP2 checkpoints ------------------------------------------

WRITTEN, OWN = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([7.0, 7.0, 7.0])


def _fsdp2_run(pg, seed: int, extra: torch.Tensor | None):
    """The tiny model (its core attention carrying extra state `extra` + layer index, unless None) wrapped in
    FSDP2 the trainer's way, with its optimizer."""
    from types import SimpleNamespace

    from megatron_regdpo.models.wan.attention import SDPAttention
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.parallel.data_parallel import wrap_data_parallel
    from megatron_regdpo.training.optimizer import build_optimizer

    class ExtraStateSDPA(SDPAttention):
        def get_extra_state(self):
            return self.fp8_meta

        def set_extra_state(self, state):
            self.fp8_meta = state

    torch.manual_seed(seed)
    model = build_wan(ARCHS["t2v"], pg)
    for n, layer in enumerate(model.decoder.layers if extra is not None else ()):
        layer.self_attention.core_attention.__class__ = ExtraStateSDPA
        layer.self_attention.core_attention.fp8_meta = extra + n
    par = SimpleNamespace(tp=1, pp=1, cp=1, sequence_parallel=False, virtual_pp=None, distributed_optimizer=False,
                          fsdp=True, grad_reduce_in_fp32=True)
    chunk = wrap_data_parallel(model, par, pg)
    return chunk, build_optimizer(OPTIM, par, torch.float32, [chunk], pg)


def extra_state_rank(rank: int, world: int, root: str) -> dict:
    """Checkpoints of a model with extra state (`te`) and without (`local`), each read by a model with its own
    (OWN) through a resume and through load_model; the extra state each reader ends with."""
    from pathlib import Path

    from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model
    from megatron_regdpo.parallel.groups import init_distributed
    from megatron_regdpo.training.checkpoint import Checkpointer

    pg, out = init_distributed(), {}
    for source, extra in (("te", WRITTEN), ("local", None)):
        ckpt = Checkpointer(Path(root) / source, pg=pg)
        path = ckpt.save(1, [(run := _fsdp2_run(pg, 1, extra))[0]], run[1], {})
        resumed, opt = _fsdp2_run(pg, 2, OWN)
        ckpt.load(path, [resumed], opt)
        model_only, _ = _fsdp2_run(pg, 3, OWN)
        load_model(model_only.module, path)  # how a resident reference reads its base checkpoint
        for how, chunk in (("resumed", resumed), ("load_model", model_only)):
            out[how, source] = [layer.self_attention.core_attention.fp8_meta for layer in chunk.module.decoder.layers]
    return out


@pytest.fixture(scope="module")
def extra_world(tmp_path_factory):
    return run_world(2, extra_state_rank, str(tmp_path_factory.mktemp("fsdp2_extra")))


@pytest.mark.parametrize("how", ["resumed", "load_model"])
@pytest.mark.parametrize("source, want", [("te", WRITTEN), ("local", OWN)], ids=["restored", "own kept if absent"])
def test_fsdp2_checkpoint_extra_state(extra_world, how, source, want):
    for rank in extra_world:
        got = rank[how, source]
        assert len(got) == ARCHS["t2v"].num_layers
        for n, meta in enumerate(got):
            assert torch.equal(meta, want + n), (how, source, n, meta)

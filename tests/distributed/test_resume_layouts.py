"""A training checkpoint saved at one layout resumes at another: TP2 -> 1 rank, 1 rank -> CP2, DP2 -> DP1,
PP2 -> TP2, and the same layout (TP2 -> TP2) stays bitwise exact. The first step after the resume equals the
uninterrupted run's step within fp32 round-off (1e-5 relative); the RNG follows training/rng_state.py's rule;
checkpoints written before that rule still load; a changed global batch is refused.

Each resumed step is compared with the uninterrupted run at the resumed layout and with the saving run
(loss and gradient norm: under PP the conditioning weights, replicated on every stage, count once in the
norm, models/wan/model.py).

The world-1 runs use this process (the session's one-rank world); all 2-rank runs share one spawned world
(spawning costs ~10 s): run 1-rank saves, then the 2-rank world, then the 1-rank resumes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _harness import run_world
from _stores import make_store, save_base

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "debug" / "tiny_cpu.yaml")
RTOL = 1e-5
SAVED = 2           # every run saves at this step, and the resumes train the next two
STEPS = (SAVED + 1, SAVED + 2)   # compared: the first after the resume, and one that needs the Adam moments
SEED = 1234         # the recipe's run.seed
KEYS = ("loss/total", "optim/grad_norm")


def _cached_store(root: Path, pg) -> tuple[Path, Path]:
    """A store with a reference cache (PP needs objective.reference.mode=cached) and its base checkpoint."""
    from megatron_regdpo.objectives.flow_matching import FlowMatchingSettings
    from megatron_regdpo.reference import checkpoint_fingerprint, write_reference_cache

    base, store = save_base(root / "base", pg), make_store(root / "cached.zarr", 4)
    ids, draws = [i for i in range(4) for _ in range(2)], [d for _ in range(4) for d in range(2)]
    write_reference_cache(store / "reference_cache", ids, draws, [2.0] * 8, [2.1] * 8, seed=SEED, step=0,
                          flow_matching=FlowMatchingSettings(shift=5.0),
                          model={"checkpoint": str(base), "checkpoint_id": checkpoint_fingerprint(base),
                                 "dtype": "torch.float32"})
    return store, base


def _args(out: Path, store: Path, steps: int, extra: tuple) -> list[str]:
    return ["--config", RECIPE, f"data.store={store}", f"run.output_dir={out}", f"schedule.train_steps={steps}",
            "objective.beta=50", f"checkpoint.interval={SAVED}", *extra]


def _resume_from(source: Path, out: Path) -> None:
    """`out` starts from `source`'s checkpoint of step SAVED (a copy: the source run stays untouched)."""
    src, dst = source / "tiny-cpu" / "checkpoints", out / "tiny-cpu" / "checkpoints"
    dst.mkdir(parents=True)
    shutil.copytree(src / f"iter_{SAVED:07d}", dst / f"iter_{SAVED:07d}")
    (dst / "latest").write_text(f"iter_{SAVED:07d}")


def _train(run: dict) -> int:
    """One trainer run of the plan: {out, store, extra, from?}; every rank of the world calls it."""
    import torch.distributed as dist

    from megatron_regdpo.train import main

    if run["from"] and dist.get_rank() == 0:
        _resume_from(Path(run["from"]), Path(run["out"]))
    dist.barrier()
    return main(_args(Path(run["out"]), Path(run["store"]), STEPS[-1], tuple(run["extra"])))


def _legacy_checkpoint(folder: Path, pg, step: int) -> torch.Tensor:
    """A training checkpoint as written before rng_state.py (the CPU generator as a ShardedObject of global
    shape (world,)); returns this rank's saved CPU state."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_regdpo.checkpoint_io.integrity import write_manifest
    from megatron_regdpo.checkpoint_io.megatron_ckpt import save_sharded
    from megatron_regdpo.training.optimizer import optimizer_checkpoint_state

    ddp, opt = _model_and_optimizer(pg)
    if dist.get_rank() == 0:
        folder.mkdir(parents=True)
    dist.barrier()
    model_sd = ddp.module.sharded_state_dict()
    rng = torch.get_rng_state()
    save_sharded({"model": model_sd, "optimizer": optimizer_checkpoint_state(opt, model_sd, False),
                  "trainer": {"step": step}, "rng": ShardedObject("rng_state", rng, (dist.get_world_size(),),
                                                                   (dist.get_rank(),), replica_id=0)}, folder)
    if dist.get_rank() == 0:
        write_manifest(folder)
    dist.barrier()
    return rng


def _model_and_optimizer(pg):
    from megatron_regdpo.config import load_config
    from megatron_regdpo.models.wan.arch import SIZES
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.parallel.data_parallel import wrap_data_parallel
    from megatron_regdpo.training.optimizer import build_optimizer

    cfg = load_config(RECIPE, ["optim.clip_grad=0"])
    ddp = wrap_data_parallel(build_wan(SIZES["debug"], pg), cfg.parallel, pg)
    opt = build_optimizer(cfg.optim, cfg.parallel, torch.float32, [ddp], pg)
    for p in ddp.parameters():  # one step: the optimizer state a trainer's checkpoint holds
        p.grad = p.main_grad = torch.zeros_like(p)
    opt.step()
    return ddp, opt


def _rng_rule(rank: int) -> dict:
    """rng_state's rule at TP2: the same layout gets this rank's states back, another re-seeds the same way
    twice."""
    from megatron.core import tensor_parallel

    from megatron_regdpo.parallel.groups import init_distributed
    from megatron_regdpo.training import rng_state

    layout = rng_state.layout_of(init_distributed(tp=2))
    torch.rand(3)
    before = rng_state.capture()
    saved = rng_state.gather(layout)
    torch.rand(5)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        torch.rand(2)
    result = {"layout": layout, "before": before, "own": saved["ranks"][rank], "others": saved["ranks"],
              "same": rng_state.restore(saved, layout, SEED, 7), "back": rng_state.capture()}
    other = {**layout, "tp": 1, "dp": 2}
    result["moved"] = rng_state.restore(saved, other, SEED, 7)
    result["first"] = rng_state.capture()
    torch.rand(4)
    rng_state.restore(saved, other, SEED, 7)
    result["second"] = rng_state.capture()
    return result


def world2(rank: int, world: int, plan: dict) -> dict:
    from megatron_regdpo.parallel.groups import init_distributed

    init_distributed()  # the process group every run below reuses (train.main builds its own layout's groups)
    rcs = {name: _train(run) for name, run in plan["runs"].items()}
    rule = _rng_rule(rank)
    _legacy_checkpoint(Path(plan["legacy"]), init_distributed(), step=5)
    return {"rcs": rcs, "rule": rule}


def _metrics(out: Path, step: int) -> dict:
    lines = [json.loads(line) for line in (out / "tiny-cpu" / "metrics.jsonl").read_text().splitlines()]
    return next(m for m in lines if m["step"] == step)


# resumed run: (the run whose checkpoint it resumes, the uninterrupted run at the resumed layout)
CASES = {"tp2_to_one": ("tp2", "one"), "one_to_cp2": ("one", "cp2"), "dp2_to_dp1": ("dp2", "dp1"),
         "pp2_to_tp2": ("pp2", "tp2_cached"), "fsdp_dp2_to_dp1": ("fsdp_dp2", "dp1")}
FSDP = ("data.global_batch_pairs=2", "parallel.fsdp=true")  # with the resident reference, sharded too


@pytest.fixture(scope="module")
def runs(pg, tmp_path_factory):
    from megatron_regdpo.train import main

    root = tmp_path_factory.mktemp("layouts")
    store = make_store(root / "pairs.zarr", 6)   # DP2 saves mid-epoch (3 global batches)
    cached, base = _cached_store(root, pg)
    cache = (f"checkpoint.load={base}", "objective.reference.mode=cached")
    o = {name: root / name for name in ("one", "dp1", "tp2", "dp2", "pp2", "cp2", "tp2_cached", "tp2_again",
                                        "fsdp_dp2", "fsdp_dp2_again", "fsdp_dp2_eval", *CASES, "dp2_gb4")}
    assert main(_args(o["one"], store, STEPS[-1], ())) == 0
    assert main(_args(o["dp1"], store, STEPS[-1], ("data.global_batch_pairs=2",))) == 0

    def run(name, extra, source=None, data=store):
        return name, {"out": str(o[name]), "store": str(data), "extra": list(extra), "from": source and str(o[source])}

    plan = {"legacy": str(root / "legacy2"), "runs": dict([
        run("tp2", ["parallel.tp=2"]), run("cp2", ["parallel.cp=2"]), run("dp2", ["data.global_batch_pairs=2"]),
        run("pp2", ["parallel.pp=2", *cache], data=cached), run("tp2_cached", ["parallel.tp=2", *cache], data=cached),
        run("tp2_again", ["parallel.tp=2"], "tp2"), run("one_to_cp2", ["parallel.cp=2"], "one"),
        run("pp2_to_tp2", ["parallel.tp=2", *cache], "pp2", data=cached),
        run("fsdp_dp2", FSDP), run("fsdp_dp2_again", FSDP, "fsdp_dp2"),
        # one held-out pair: replica 1 has none to score (it ran fewer forwards and hung FSDP2's gathers),
        # and the checkpoint of that step follows the forward-only evaluation
        run("fsdp_dp2_eval", [*FSDP, "eval.holdout_pairs=1", f"eval.interval={SAVED}"])])}
    spawned = run_world(2, world2, plan)
    assert spawned[0]["rcs"] == {name: 0 for name in plan["runs"]}, spawned[0]["rcs"]
    _resume_from(o["tp2"], o["tp2_to_one"])
    assert main(_args(o["tp2_to_one"], store, STEPS[-1], ())) == 0
    _resume_from(o["fsdp_dp2"], o["fsdp_dp2_to_dp1"])
    assert main(_args(o["fsdp_dp2_to_dp1"], store, STEPS[-1], FSDP)) == 0
    _resume_from(o["dp2"], o["dp2_to_dp1"])
    assert main(_args(o["dp2_to_dp1"], store, STEPS[-1], ("data.global_batch_pairs=2",))) == 0
    return {"out": o, "store": store, "spawned": spawned, "legacy2": root / "legacy2", "root": root}


def _close(got: float, want: float) -> bool:
    return abs(got - want) <= RTOL * abs(want)


@pytest.mark.parametrize("resumed", list(CASES))
def test_another_layout_continues_the_run(runs, resumed):
    """The resumed step is the step the resumed layout computes when it trains from the start, and the step
    the saving layout computes."""
    source, reference = CASES[resumed]
    for step in STEPS:
        got = _metrics(runs["out"][resumed], step)
        want, saver = _metrics(runs["out"][reference], step), _metrics(runs["out"][source], step)
        for key in KEYS:
            assert _close(got[key], want[key]), (step, key, got[key], want[key])
        for key in KEYS:
            assert _close(got[key], saver[key]), (step, key, got[key], saver[key])
    steps = [json.loads(line)["step"] for line in (runs["out"][resumed] / "tiny-cpu" / "metrics.jsonl").open()]
    assert steps == list(STEPS)


@pytest.mark.parametrize("layout", ["tp2", "fsdp_dp2"])
def test_the_same_layout_stays_bitwise(runs, layout):
    for step in STEPS:
        want, got = _metrics(runs["out"][layout], step), _metrics(runs["out"][f"{layout}_again"], step)
        assert [got[k] for k in (*KEYS, "dpo/dgr")] == [want[k] for k in (*KEYS, "dpo/dgr")], step


def test_fsdp_trains_as_ddp(runs):
    """The trainer with parallel.fsdp (FSDP2, resident reference sharded) computes DDP's steps at DP2."""
    for step in (1, *STEPS):
        got, want = _metrics(runs["out"]["fsdp_dp2"], step), _metrics(runs["out"]["dp2"], step)
        for key in (*KEYS, "dpo/dgr"):
            assert _close(got[key], want[key]), (step, key, got[key], want[key])


def test_rng_rule(runs):
    from megatron_regdpo.training.rng_state import resume_seed

    ranks = [r["rule"] for r in runs["spawned"]]
    assert ranks[0]["layout"] == {"tp": 2, "pp": 1, "cp": 1, "dp": 1, "device": "cpu"}
    for r in ranks:   # same layout: the rank's own states, bitwise
        assert r["same"] and torch.equal(r["back"]["cpu"], r["own"]["cpu"])
        assert r["back"]["tracker"].keys() == r["own"]["tracker"].keys() and r["own"]["tracker"]
        assert all(torch.equal(r["back"]["tracker"][k], v) for k, v in r["own"]["tracker"].items())
        assert len(r["others"]) == 2 and torch.equal(r["before"]["cpu"], r["own"]["cpu"])  # gathered in rank order
        assert all(torch.equal(r["before"]["tracker"][k], v) for k, v in r["own"]["tracker"].items())
    seeded = torch.Generator().manual_seed(resume_seed(SEED, 7)).get_state()
    for r in ranks:   # another layout: re-seeded, the same way each time
        assert not r["moved"] and torch.equal(r["first"]["cpu"], seeded)
        assert all(torch.equal(r["first"]["tracker"][k], v) for k, v in r["second"]["tracker"].items())
        assert torch.equal(r["first"]["cpu"], r["second"]["cpu"])
    mp = "model-parallel-rng"   # megatron-core's stream for tensor-parallel regions: one per TP rank
    assert not torch.equal(ranks[0]["first"]["tracker"][mp], ranks[1]["first"]["tracker"][mp])


def test_checkpoints_before_the_rule_still_load(runs, pg):
    """A checkpoint with the RNG as a per-rank ShardedObject restores it at its own world size (1 here) and
    re-seeds at another (saved by 2 ranks)."""
    from megatron_regdpo.training.checkpoint import Checkpointer
    from megatron_regdpo.training.rng_state import resume_seed

    own = runs["root"] / "legacy1"
    saved = _legacy_checkpoint(own, pg, step=3)
    ddp, opt = _model_and_optimizer(pg)
    torch.rand(7)
    assert Checkpointer(runs["root"], pg=pg, seed=SEED).load(own, [ddp], opt)["step"] == 3
    assert torch.equal(torch.get_rng_state(), saved)
    assert Checkpointer(runs["root"], pg=pg, seed=SEED).load(runs["legacy2"], [ddp], opt)["step"] == 5
    assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(resume_seed(SEED, 5)).get_state())


def test_another_global_batch_is_refused(runs, capsys):
    from megatron_regdpo.train import main

    out = runs["out"]["dp2_gb4"]
    _resume_from(runs["out"]["dp2"], out)
    capsys.readouterr()
    assert main(_args(out, runs["store"], SAVED + 1, ("data.global_batch_pairs=4",))) == 2
    err = capsys.readouterr().err
    assert "cannot resume with data.global_batch_pairs=4" in err and "global batches of 2 pairs" in err, err


def test_a_chunk_may_bring_its_own_checkpoint_form(pg, tmp_path):
    """The protocol for wrappers whose parameters are not the module's (parallel/fsdp2.py): a chunk's own
    `checkpoint_sharded_state_dict()` is saved and its `load_checkpoint_state(state_dict)` loads."""
    from megatron_regdpo.training.checkpoint import Checkpointer

    ddp, opt = _model_and_optimizer(pg)
    calls = []

    class Own(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ddp

        def checkpoint_sharded_state_dict(self):
            calls.append("save")
            return ddp.module.sharded_state_dict()

        def load_checkpoint_state(self, state_dict):
            calls.append(sorted(state_dict) == sorted(ddp.module.sharded_state_dict()))
            ddp.module.load_state_dict(state_dict, strict=True)

    ck = Checkpointer(tmp_path, pg=pg, seed=SEED)
    saved = ck.save(1, [Own()], opt, {})
    assert ck.load(saved, [Own()], opt)["step"] == 1
    assert calls == ["save", "save", True]   # a load asks for the same form it then hands over


def test_fsdp_evaluates_held_out_pairs_that_not_every_replica_has(runs):
    """The forward-only evaluation under FSDP2 with fewer held-out pairs than replicas, then a checkpoint."""
    m = _metrics(runs["out"]["fsdp_dp2_eval"], SAVED)
    assert {"eval/implicit_acc", "eval/dpo"} <= set(m)
    assert (runs["out"]["fsdp_dp2_eval"] / "tiny-cpu" / "checkpoints" / f"iter_{SAVED:07d}").is_dir()

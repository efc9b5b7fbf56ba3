"""Every model-based reference mode under pipeline parallelism: a PP2 trainer run computes the one-rank run's
steps (loss/total, the dpo/ metrics, the held-out eval/ ones) within fp32 round-off.

Under PP the reference runs as a forward-only pass through megatron-core's schedule (training/step.py
`reference_pass`): lora_base the policy's stages with adapters off, resident and cpu_swap the frozen copy's
stages (cpu_swap swapped in per step); lora_base and resident also under FSDP2. Two micro-batches per step, so the
last stage hands each micro-batch its own errors, in order.

The one-rank runs use this process (the session's one-rank world); the PP2 runs share one spawned world.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _harness import run_world
from _stores import make_store, save_base

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "debug" / "tiny_cpu.yaml")
STEPS, TOL = 3, 1e-5   # relative, absolute below 1 (dpo/reward_margin is a difference of near errors)
LORA = ("lora.rank=4", "lora.alpha=8")
# recipe -> its overrides; each runs on one rank and at PP2 (2 ranks)
RECIPES = {
    "lora_base": ("objective.reference.mode=lora_base", *LORA, "eval.interval=2", "eval.holdout_pairs=1"),
    "resident": ("objective.reference.mode=resident",),
    "cpu_swap": ("objective.reference.mode=cpu_swap", *LORA),
}
# under FSDP2 (parallel.fsdp: the policy sharded, the resident reference too): compared with the DDP run
RECIPES.update({f"{name}_fsdp": (*RECIPES[name], "parallel.fsdp=true") for name in ("lora_base", "resident")})


def _args(out: str, inputs: dict, extra: tuple) -> list[str]:
    return ["--config", RECIPE, f"data.store={inputs['store']}", f"checkpoint.load={inputs['base']}",
            f"run.output_dir={out}", f"schedule.train_steps={STEPS}",
            "objective.beta=50", "data.global_batch_pairs=2", "data.micro_batch_pairs=1", "checkpoint.interval=0",
            *extra]


def pp2_world(rank: int, world: int, plan: dict) -> dict:
    from megatron_regdpo.parallel.groups import init_distributed
    from megatron_regdpo.train import main

    init_distributed()
    return {name: main(_args(out, plan["inputs"], ("parallel.pp=2", *RECIPES[name])))
            for name, out in plan["outs"].items()}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "tiny-cpu" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(pg, tmp_path_factory):
    from megatron_regdpo.train import main

    root = tmp_path_factory.mktemp("pp_references")
    inputs = {"store": str(make_store(root / "pairs.zarr", 5)), "base": str(save_base(root / "base", pg))}
    one = {name: root / f"one_{name}" for name in RECIPES if not name.endswith("_fsdp")}
    for name, out in one.items():
        assert main(_args(str(out), inputs, RECIPES[name])) == 0
    pp2 = {name: root / f"pp2_{name}" for name in RECIPES}
    rcs = run_world(2, pp2_world, {"inputs": inputs, "outs": {k: str(v) for k, v in pp2.items()}})
    assert rcs[0] == {name: 0 for name in RECIPES}, rcs
    return {"one": one, "pp2": pp2}


@pytest.mark.parametrize("name", list(RECIPES))
def test_pp2_reference_matches_one_rank(runs, name):
    want_run = runs["one"][name.removesuffix("_fsdp")]   # FSDP2 trains as DDP
    got, want = _metrics(runs["pp2"][name]), _metrics(want_run)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        keys = [k for k in w if k.startswith(("loss/", "dpo/", "eval/"))]
        assert "loss/total" in keys and any(k.startswith("dpo/") for k in keys), sorted(w)
        assert sorted(k for k in g if k.startswith(("loss/", "dpo/", "eval/"))) == sorted(keys)
        for k in keys:
            assert abs(g[k] - w[k]) <= TOL * max(1.0, abs(w[k])), (g["step"], k, g[k], w[k])
    if name.startswith("lora_base"):  # the held-out evaluation ran its reference through the schedule too
        assert "eval/implicit_acc" in got[1]


def test_reference_differs_from_policy_after_an_update(runs):
    """The comparison has teeth: the reference errors are not the policy's once the policy has moved."""
    for name in ("lora_base", "resident"):
        last = _metrics(runs["pp2"][name])[-1]
        assert last["dpo/err_ref_w"] != last["dpo/err_pol_w"], last

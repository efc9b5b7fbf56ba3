"""megatron-core's distributed optimizer through the trainer's Checkpointer: a run saved after two AdamW
steps and resumed takes the same third step as the run that never stopped, bitwise at the same layout
(DP2, fp32 and bf16 parameters), within fp32 round-off across layouts (DP2 -> DP1, DP1 -> DP2, TP2 -> TP1),
and so do the optimizer's moments and per-parameter steps. A save before the first step resumes too.

One spawned world of 2 ranks runs every 2-rank case; the 1-rank runs happen in this process (before
the world: the checkpoint DP2 loads; after it: the loads of what DP2 and TP2 saved).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from _cases import BETA, PAIRS, SFT, T2V, TOKENS, _global_names, _shard, _unshard, make_payload
from _harness import run_world

pytestmark = pytest.mark.distributed
RTOL = 1e-5
STEPS, SAVE_AT = 3, 2
OPTIM = SimpleNamespace(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-3, clip_grad=1.0)


def _train(payload: dict, layout: dict) -> dict:
    """Build the tiny T2V model under `layout` (tp, dtype) with the distributed optimizer, load the
    checkpoint `layout['load']` if given, train to STEPS saving at `layout['save_at']` into `layout['save']`;
    return full-shape parameters and optimizer state keyed by global parameter name."""
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.objectives.per_sample import sum_across_group
    from megatron_regdpo.parallel.data_parallel import wrap_data_parallel
    from megatron_regdpo.parallel.groups import init_distributed
    from megatron_regdpo.parallel.pipeline import forward_backward
    from megatron_regdpo.training.checkpoint import Checkpointer
    from megatron_regdpo.training.optimizer import build_optimizer, optimizer_step

    tp, dtype = layout.get("tp", 1), layout.get("dtype", torch.float32)
    par = SimpleNamespace(tp=tp, pp=1, cp=1, sequence_parallel=False, virtual_pp=None, distributed_optimizer=True,
                          fsdp=False, grad_reduce_in_fp32=False)
    pg = init_distributed(tp)
    model = build_wan(T2V, pg, parallel=par, params_dtype=dtype, init_weights=False)
    names = _global_names(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_shard(payload["weights"][names[name]], p, pg.tp).to(dtype))
    ddp = wrap_data_parallel(model, par, pg)
    opt = build_optimizer(OPTIM, par, dtype, [ddp], pg)
    ckpt = Checkpointer(layout.get("save", "/nonexistent"))
    start = ckpt.load(layout["load"], [ddp], opt)["step"] if layout.get("load") else 0
    dp_rank, per_dp = dist.get_rank(pg.dp), PAIRS // dist.get_world_size(pg.dp)

    def forward_step(data_iterator, chunk):
        b = payload["pairs"][next(data_iterator)]
        out = chunk(b["x"].to(dtype), b["t"], b["text"].to(dtype), None, return_tokens=True)

        def loss_func(out_BSP):
            sq = sum_across_group((out_BSP.float() - model.patchify(b["target"])).pow(2).sum(dim=(1, 2)), pg.cp)
            err = sq / b["target"][0].numel()
            loss = -F.logsigmoid(-BETA * (err[0] - err[1])) + SFT * err[0]
            return loss, {"loss": loss.detach().clone()}
        return out, loss_func

    for step in range(start, STEPS + 1):
        if step == layout.get("save_at"):
            ckpt.save(step, [ddp], opt, {})
        if step == STEPS:
            break
        ddp.zero_grad_buffer()
        opt.zero_grad()
        losses = forward_backward([ddp], forward_step, iter(range(dp_rank * per_dp, (dp_rank + 1) * per_dp)),
                                  num_microbatches=per_dp, tokens=TOKENS, micro_batch_size=2, pg_collection=pg)
        applied, _ = optimizer_step(opt, float(sum(l["loss"] for l in losses)), OPTIM.clip_grad)
        assert applied
    params = {names[n]: _unshard(p, p, pg.tp).float() for n, p in model.named_parameters()}
    return {"params": params, "state": _optimizer_state(opt, model, names, pg)}


def _optimizer_state(opt, model, names: dict, pg) -> dict:
    """name -> {'param' (fp32 main), 'exp_avg', 'exp_avg_sq': full shape; 'steps': the set of step values}
    assembled from every DP rank's shard (read from megatron's own shard maps, not its checkpoint code)."""
    [leaf] = getattr(opt, "chained_optimizers", [opt])
    out = {}
    for name, p in model.named_parameters():
        flat = {k: torch.zeros(p.numel()) for k in ("param", "exp_avg", "exp_avg_sq")}
        steps = []
        if p in leaf.model_param_group_index_map:
            g, i = leaf.model_param_group_index_map[p]
            main = leaf.optimizer.param_groups[g]["params"][i]
            rng = leaf._get_model_param_range_map(p)["param"]
            state = leaf.optimizer.state[main]
            for k in flat:
                flat[k][rng.start:rng.end] = (main if k == "param" else state[k]).detach().float()
            steps.append(state["step"])
        for t in flat.values():
            dist.all_reduce(t, group=pg.dp)  # each element is held by exactly one DP rank
        out[names[name]] = {k: _unshard(v.view(p.shape), p, pg.tp) for k, v in flat.items()}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [float(s) for s in steps])
        out[names[name]]["steps"] = {s for rank in gathered for s in rank}
    # torch's AdamW increments each parameter's step tensor in place: one shared tensor counts N times
    steps = [s["step"] for s in leaf.optimizer.state.values()]
    assert len({id(t) for t in steps}) == len(steps), "parameters share one step tensor"
    return out


def run_world_cases(rank: int, world: int, payload: dict) -> dict:
    from megatron_regdpo.parallel.groups import destroy_distributed, init_distributed

    init_distributed(rank=rank, world_size=world)
    try:
        return {name: _train(payload, layout) for name, layout in payload["cases"].items()}
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def runs(pg, tmp_path_factory):
    root = tmp_path_factory.mktemp("distopt")
    payload = make_payload("t2v")
    dp1 = {"uninterrupted": _train(payload, {"save": str(root / "dp1"), "save_at": SAVE_AT})}
    ckpt = lambda name, step=SAVE_AT: str(root / name / f"iter_{step:07d}")
    cases = {"DP1->DP2": {"load": ckpt("dp1")}}
    for tag, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cases[f"DP2-{tag}"] = {"dtype": dtype}
        cases[f"DP2-{tag}-saving"] = {"dtype": dtype, "save": str(root / f"dp2-{tag}"), "save_at": SAVE_AT}
        cases[f"DP2-{tag}-resumed"] = {"dtype": dtype, "load": ckpt(f"dp2-{tag}")}
    cases["DP2-saved-at-0"] = {"save": str(root / "dp2-at0"), "save_at": 0}
    cases["DP2-resumed-from-0"] = {"load": ckpt("dp2-at0", 0)}
    cases["TP2"] = {"tp": 2, "save": str(root / "tp2"), "save_at": SAVE_AT}
    world = run_world(2, run_world_cases, {**payload, "cases": cases})
    dp1["DP2->DP1"] = _train(payload, {"load": ckpt("dp2-fp32")})
    dp1["TP2->TP1"] = _train(payload, {"load": ckpt("tp2")})
    dp1["dp1 folder"] = str(root / "dp1")
    return dp1, world


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _compare(got: dict, want: dict, exact: bool) -> None:
    assert got["params"].keys() == want["params"].keys()
    for name, p in got["params"].items():
        if exact:
            assert torch.equal(p, want["params"][name]), f"{name} after the resumed step"
        else:
            assert _rel(p, want["params"][name]) < RTOL, f"{name}: {_rel(p, want['params'][name]):.2e}"
    for name, st in got["state"].items():
        assert st["steps"] == {float(STEPS)}, f"{name}: steps {st['steps']}"
        for k in ("param", "exp_avg", "exp_avg_sq"):
            a, b = st[k], want["state"][name][k]
            assert torch.equal(a, b) if exact else _rel(a, b) < RTOL, f"{name} {k}: {_rel(a, b):.2e}"


@pytest.mark.parametrize("tag", ["fp32", "bf16"])
def test_resume_at_dp2_is_bitwise(runs, tag):
    _, world = runs
    for rank in range(2):
        _compare(world[rank][f"DP2-{tag}-saving"], world[rank][f"DP2-{tag}"], exact=True)  # a save changes nothing
        _compare(world[rank][f"DP2-{tag}-resumed"], world[rank][f"DP2-{tag}"], exact=True)


def test_save_before_the_first_step_resumes_bitwise(runs):
    _, world = runs
    for rank in range(2):
        _compare(world[rank]["DP2-saved-at-0"], world[rank]["DP2-fp32"], exact=True)
        _compare(world[rank]["DP2-resumed-from-0"], world[rank]["DP2-fp32"], exact=True)


@pytest.mark.parametrize("resumed", ["DP2->DP1", "TP2->TP1"])
def test_resume_at_one_rank(runs, resumed):
    dp1, _ = runs
    _compare(dp1[resumed], dp1["uninterrupted"], exact=False)


def test_dp1_checkpoint_resumes_at_dp2(runs):
    dp1, world = runs
    for rank in range(2):
        _compare(world[rank]["DP1->DP2"], dp1["uninterrupted"], exact=False)


def test_its_checkpoint_names_the_flag_to_resume_with(runs):
    """The distributed optimizer's state has a layout of its own: a run without it is told which flag resumes
    the checkpoint (one CheckpointError, nothing loaded), not megatron's KeyError about parameter groups."""
    from _fsdp_cases import run_resume_case

    from megatron_regdpo.checkpoint_io.integrity import CheckpointError

    folder = runs[0]["dp1 folder"]
    with pytest.raises(CheckpointError, match=r"optimizer.json: holds the distributed optimizer's state; .*"
                                              r"resume with parallel.distributed_optimizer=true"):
        run_resume_case({"resume": folder}, make_payload("t2v"))

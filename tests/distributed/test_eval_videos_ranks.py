"""Validation videos on 2 ranks give the one-rank run's: DP2 (the videos split over the replicas, one
all_gather_object of the records), TP2 (both ranks sample together, one writes) and FSDP2 over DP2 (the replica
short of a video samples one more and drops it, so every weight gather has a partner). Same files, same
flow-matching errors (fp32 round-off), the same pictures (H.264 of near-equal frames).

A resident reference (full fine-tune from a base checkpoint) here; the integration test covers lora_base.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _harness import run_world
from _stores import make_store, save_base

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "debug" / "tiny_cpu.yaml")
LAYOUTS = {"dp2": (), "tp2": ("parallel.tp=2",), "fsdp_dp2": ("parallel.fsdp=true",)}


def _args(out: str, inputs: dict, extra: tuple) -> list[str]:
    return ["--config", RECIPE, f"data.store={inputs['store']}", f"checkpoint.load={inputs['base']}",
            f"run.output_dir={out}", "schedule.train_steps=1", "objective.beta=50", "data.global_batch_pairs=2",
            "objective.reference.mode=resident", "eval.holdout_pairs=3", "eval.videos.count=3",
            "eval.videos.interval=1", "eval.videos.steps=2", "eval.videos.fm_sigmas=[0.5]", *extra]


def two_ranks(rank: int, world: int, plan: dict) -> dict:
    from megatron_regdpo.parallel.groups import init_distributed
    from megatron_regdpo.train import main

    init_distributed()
    return {name: main(_args(out, plan["inputs"], LAYOUTS[name])) for name, out in plan["outs"].items()}


def _store_with_vae(root: Path) -> Path:
    """The random-latent store plus what videos need: the tiny VAE in its attrs and a negative prompt."""
    from megatron_regdpo.data.encode import tiny_models
    from megatron_regdpo.data.encode.vae import WanVAE
    from megatron_regdpo.data.store import GTPairStore

    path = make_store(root / "pairs.zarr", 5)
    store = GTPairStore(path, "a")
    store.write_text("neg", torch.zeros(16, 32), torch.arange(16) < 2, "")
    store.update_attrs(vae=WanVAE.load(tiny_models(root / "models").vae).describe(), negative_prompt_id="neg")
    store.finalize()
    return path


def _frames(path: Path) -> torch.Tensor:
    import av

    with av.open(str(path)) as c:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]).float()


def test_two_ranks_write_the_one_rank_videos(pg, tmp_path):
    from megatron_regdpo.train import main

    inputs = {"store": str(_store_with_vae(tmp_path)), "base": str(save_base(tmp_path / "base", pg))}
    assert main(_args(str(tmp_path / "one"), inputs, ())) == 0
    outs = {name: str(tmp_path / name) for name in LAYOUTS}
    assert run_world(2, two_ranks, {"inputs": inputs, "outs": outs})[0] == {name: 0 for name in LAYOUTS}

    def last(out):
        return json.loads((Path(out) / "tiny-cpu" / "metrics.jsonl").read_text().splitlines()[-1])

    want = last(tmp_path / "one")
    assert len(want["eval/videos"]) == 3 and want["eval/fm_err_policy"] > 0
    for name, out in outs.items():
        got = last(out)
        assert got["eval/videos"] == want["eval/videos"], name
        for key in ("eval/fm_err_policy", "eval/fm_err_reference", "eval/fm_err_policy/sigma_0.50"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (name, key)
        for video in want["eval/videos"]:
            diff = (_frames(Path(out) / "tiny-cpu" / video) - _frames(tmp_path / "one" / "tiny-cpu" / video)).abs()
            assert diff.mean() < 0.5, (name, video, float(diff.mean()))

"""Validation videos end to end on the tiny store: the trainer's eval.videos hook (mp4 panels, metrics.jsonl,
flow-matching errors, CLIP scores with a tiny random CLIP saved here) and tools/sample_videos.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tool

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "debug" / "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from megatron_regdpo.training.eval_quality import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def read_frames(path: Path) -> torch.Tensor:
    import av

    with av.open(str(path)) as c:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)])


def _train_args(store, out, *extra):
    return ["--config", RECIPE, f"data.store={store}", f"run.output_dir={out}", "schedule.train_steps=2",
            "objective.beta=50", "data.global_batch_pairs=1", "lora.rank=2", "lora.alpha=4",
            "objective.reference.mode=lora_base", "eval.holdout_pairs=1", "eval.videos.count=2",
            "eval.videos.interval=2", "eval.videos.steps=2", *extra]


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory, clip_dir):
    """Two LoRA steps with validation videos at step 2 (and the step-2 checkpoint)."""
    from megatron_regdpo.train import main

    out = tmp_path_factory.mktemp("eval_videos")
    assert main(_train_args(store, out, f"eval.clip={clip_dir}")) == 0
    return out / "tiny-cpu"


def test_trainer_writes_policy_and_reference_videos(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert "eval/videos" not in records[0]
    last = records[1]
    assert last["step"] == 2 and last["time/eval_videos_s"] > 0
    [video] = last["eval/videos"]  # one held-out pair: one real clip (count=2 asks for at most two)
    assert video.startswith("eval_videos/step_0000002/00_") and video.endswith(".mp4")
    frames = read_frames(trained / video)
    index = json.loads((trained / "eval_videos" / "step_0000002" / "index.json").read_text())
    assert index["videos"][0]["panels"] == "real | reference | policy"
    assert frames.shape[0] == 9 and frames.shape[2] == 3 * 64 + 2 * 4  # three 64-px panels, two 4-px columns
    for name in ("policy", "reference", "real"):
        assert -100 <= last[f"eval/clip_{name}"] <= 100
        assert index["videos"][0][f"clip_{name}"] == pytest.approx(last[f"eval/clip_{name}"])
    for name in ("policy", "reference"):
        assert last[f"eval/fm_err_{name}"] > 0
        assert {f"eval/fm_err_{name}/sigma_{s}" for s in ("0.25", "0.50", "0.75")} <= set(last)


def test_sample_videos_tool_reproduces_the_trainer(trained, store, tmp_path):
    """The step-2 checkpoint sampled offline with the run's seed: the trainer's video and numbers."""
    out = tmp_path / "offline"
    ckpt = trained / "checkpoints" / "iter_0000002"
    assert tool("sample_videos").main(["--ckpt", str(ckpt), "--store", str(store), "--out", str(out),
                                       "--holdout-pairs", "1", "--steps", "2"]) == 0
    [record] = json.loads((out / "index.json").read_text())["videos"]
    online = json.loads((trained / "eval_videos" / "step_0000002" / "index.json").read_text())
    assert record["file"] == online["videos"][0]["file"] and record["panels"] == "real | reference | policy"
    got = read_frames(out / record["file"]).float()
    want = read_frames(trained / "eval_videos" / "step_0000002" / record["file"]).float()
    assert (got - want).abs().mean() < 0.5
    for key, value in online["metrics"].items():
        if key.startswith("eval/fm_err"):
            assert json.loads((out / "index.json").read_text())["metrics"][key] == pytest.approx(value, rel=1e-4)


def test_sample_videos_tool_with_a_prompts_file(trained, store, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# validation prompts\na red ball rolls left\n\na blue square\n")
    out = tmp_path / "offline"
    ckpt = trained / "checkpoints" / "iter_0000002"
    assert tool("sample_videos").main(["--ckpt", str(ckpt), "--store", str(store), "--out", str(out),
                                       "--prompts", str(prompts), "--steps", "1", "--fm-sigmas"]) == 0
    records = json.loads((out / "index.json").read_text())["videos"]
    assert [(r["file"], r["caption"], r["panels"]) for r in records] == [
        ("00_prompt.mp4", "a red ball rolls left", "reference | policy"),
        ("01_prompt.mp4", "a blue square", "reference | policy")]
    assert read_frames(out / "00_prompt.mp4").shape[2] == 2 * 64 + 4
    assert tool("sample_videos").main(["--ckpt", str(ckpt), "--store", str(store), "--out", str(tmp_path / "x")]) == 2
    assert tool("sample_videos").main(["--ckpt", str(ckpt), "--store", str(store), "--out", str(tmp_path),
                                       "--prompts", str(prompts)]) == 2  # a folder of other files

"""The pieces of the validation videos and their quality numbers: the flow-matching error at fixed noise levels
(against the model's own forward), the CLIP score (against CLIPModel's own logits, tiny random CLIP saved here),
the n-panel layout, the split over replicas, and the config checks of eval.videos."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_regdpo.config import ConfigError, load_config, validate
from megatron_regdpo.data.preview import panels
from megatron_regdpo.models.wan.arch import SIZES
from megatron_regdpo.models.wan.build import build_wan
from megatron_regdpo.training.eval_quality import ClipScorer, RealClip, fm_errors, fm_metrics, plain, save_tiny_clip
from megatron_regdpo.training.eval_videos import _share

ROOT = Path(__file__).resolve().parents[2]
SIGMAS = (0.25, 0.5, 0.75)


@pytest.fixture(scope="module")
def models(pg):
    torch.manual_seed(0)
    a = build_wan(SIZES["debug"], pg)
    torch.manual_seed(1)
    return a, build_wan(SIZES["debug"], pg)


def _clip(key=7) -> RealClip:
    g = torch.Generator().manual_seed(3)
    return RealClip(key, torch.randn(16, 2, 4, 4, generator=g), torch.randn(5, SIZES["debug"].text_dim, generator=g))


def test_fm_error_is_the_models_mean_squared_velocity_error(models):
    from megatron_regdpo.objectives.flow_matching import pair_noise

    a, b = models
    clip = _clip()
    got = fm_errors({"policy": plain(a), "reference": plain(b), "same": plain(a)}, clip, SIGMAS, seed=1,
                    device="cpu", dtype=torch.float32)
    assert got["policy"] == got["same"] and got["policy"] != got["reference"]
    assert fm_errors({"policy": plain(a)}, clip, SIGMAS, seed=1, device="cpu", dtype=torch.float32) == \
        {"policy": got["policy"]}  # the same fixed noise at every evaluation
    eps = pair_noise(1, 2**40, clip.key, clip.x0_CFhw.shape)
    for s, err in zip(SIGMAS, got["policy"]):
        x_t = (1 - s) * clip.x0_CFhw + s * eps
        with torch.no_grad():
            v = a(x_t[None], torch.tensor([1000 * s]), clip.text_TE[None])[0]
        assert err == pytest.approx(float(((v - (eps - clip.x0_CFhw)) ** 2).mean()), rel=1e-5)
    m = fm_metrics([got, got], SIGMAS)
    assert m["eval/fm_err_policy"] == pytest.approx(sum(got["policy"]) / 3)
    assert m["eval/fm_err_reference/sigma_0.50"] == pytest.approx(got["reference"][1])


def test_clip_score_is_clips_cosine(tmp_path):
    from transformers import CLIPModel

    folder = save_tiny_clip(tmp_path / "clip")
    scorer = ClipScorer(folder)
    frame = torch.randint(0, 256, (1, 3, 40, 48), dtype=torch.uint8)
    model = CLIPModel.from_pretrained(folder).eval()
    pixels = scorer.processor(images=[frame[0].permute(1, 2, 0).numpy()], return_tensors="pt")["pixel_values"]
    tokens = scorer.tokenizer(["a red ball"], return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        want = 100 * float(out.logits_per_image[0, 0] / model.logit_scale.exp())
    assert scorer.score(frame, "a red ball") == pytest.approx(want, rel=1e-4)
    video = frame.expand(20, -1, -1, -1)  # the mean over the chosen frames of one repeated frame
    assert scorer.score(video, "a red ball") == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError, match="eval.clip=.*config.json"):
        ClipScorer(tmp_path)


def test_panels_put_white_columns_between_and_pad_to_even():
    videos = [torch.full((2, 3, 5, 7), v, dtype=torch.uint8) for v in (10, 20, 30)]
    out = panels(videos)
    assert out.shape == (2, 6, 3 * 7 + 2 * 4 + 1, 3)  # odd height and width padded with black
    assert (out[:, :5, 7:11] == 255).all() and (out[:, :5, 18:22] == 255).all()
    assert (out[:, :5, :7] == 10).all() and (out[:, :5, 22:29] == 30).all() and (out[:, 5] == 0).all()


def test_share_splits_over_replicas_and_pads_for_fsdp():
    items = list(range(5))
    assert [_share(items, r, 2, False) for r in range(2)] == [[(0, True), (2, True), (4, True)],
                                                              [(1, True), (3, True)]]
    assert _share(items, 1, 2, True) == [(1, True), (3, True), (0, False)]   # as many forwards as replica 0
    assert _share(items, 3, 4, True) == [(3, True), (0, False)]
    assert _share([], 0, 2, True) == []


def _errors(*overrides) -> str:
    cfg = load_config(str(ROOT / "recipes" / "debug" / "tiny_cpu.yaml"), list(overrides))
    with pytest.raises(ConfigError) as info:
        validate(cfg, 2, dataclasses.replace(SIZES["debug"]))
    return str(info.value)


def test_eval_videos_config_checks(tmp_path):
    msg = _errors("eval.videos.count=2")
    assert "needs a step interval" in msg and "set eval.holdout_pairs > 0" in msg
    assert "parallel.pp=1 (got pp=2)" in _errors("eval.videos.count=1", "eval.interval=1", "eval.holdout_pairs=1",
                                                 "parallel.pp=2")
    assert "keeps no reference model" in _errors("eval.videos.count=1", "eval.videos.interval=1",
                                                 "eval.holdout_pairs=1", "objective.reference.mode=cached")
    assert "fm_sigmas=[0.5, 1.0]" in _errors("eval.videos.fm_sigmas=[0.5, 1.0]")
    assert f"eval.clip={tmp_path / 'no'} is not a folder" in _errors(f"eval.clip={tmp_path / 'no'}")
    assert "prompts_file=nope.txt does not exist" in _errors("eval.videos.count=1", "eval.videos.interval=1",
                                                             "eval.videos.prompts_file=nope.txt")
    ok = load_config(str(ROOT / "recipes" / "debug" / "tiny_cpu.yaml"),
                     ["eval.videos.count=1", "eval.videos.interval=5", "eval.holdout_pairs=1",
                      "objective.reference.mode=cached", "eval.videos.reference=false"])
    validate(ok, 1, SIZES["debug"])


def test_i2v_prompts_condition_both_the_sampler_and_the_fm_error(pg):
    """I2V: the 20 condition channels and the CLIP tokens reach the model in both paths."""
    from megatron_regdpo.data.negatives import SamplerOptions
    from megatron_regdpo.training.eval_videos import VideoPrompt, sample_models

    torch.manual_seed(0)
    model = build_wan(dataclasses.replace(SIZES["debug"], in_channels=36, image_dim=32), pg)
    g = torch.Generator().manual_seed(4)
    text = torch.randn(5, SIZES["debug"].text_dim, generator=g)
    conds = [(torch.randn(20, 2, 4, 4, generator=g), torch.randn(3, 32, generator=g)) for _ in range(2)]
    x0 = torch.randn(16, 2, 4, 4, generator=g)
    errs = [fm_errors({"policy": plain(model)}, RealClip(1, x0, text, c), SIGMAS, seed=0, device="cpu",
                      dtype=torch.float32)["policy"] for c in conds]
    assert errs[0] != errs[1]
    opts = SamplerOptions(steps=2, guidance=3.0, seed=0)
    videos = [sample_models({"policy": plain(model)}, VideoPrompt("a", "a", "k", text, (16, 2, 4, 4), cond=c), opts,
                            torch.zeros_like(text), "cpu", torch.float32)["policy"] for c in conds]
    assert videos[0].shape == (16, 2, 4, 4) and not torch.equal(videos[0], videos[1])


def test_middle_frame_reads_the_video_back(tmp_path):
    from megatron_regdpo.data.preview import MPEG4, write_video
    from megatron_regdpo.training.metrics_log import middle_frame

    frames = torch.zeros(5, 16, 16, 3, dtype=torch.uint8)
    frames[2] = 200
    write_video(tmp_path / "v.mp4", frames.numpy(), 8.0, MPEG4)
    got = middle_frame(tmp_path / "v.mp4")
    assert got.shape == (16, 16, 3) and abs(float(got.mean()) - 200) < 8

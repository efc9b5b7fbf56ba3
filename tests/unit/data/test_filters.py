"""The clip filters: the measures on tensors, then VideoDecoder skipping real files (upscale, static, scene cut)
with the measured value and the threshold in the reason's detail, and accepting the moving test patterns."""
from __future__ import annotations

import pytest
import torch

from megatron_regdpo.data.decode import DecodeOptions, VideoDecoder
from megatron_regdpo.data.decode.filters import cover_scale, cut_score, histogram_distances, luma_histograms, motion
from megatron_regdpo.data.decode.synth import TEST_CLIPS, write_video
from megatron_regdpo.data.errors import BadInput

OPTS = dict(fps=8, frames=9, short_side=64, bucket="1:1")


def _skip_reason(path, **kw) -> BadInput:
    with pytest.raises(BadInput) as e:
        VideoDecoder(DecodeOptions(**{**OPTS, **kw})).load(path)
    return e.value


# --------------------------------------------------------------------------- measures

def test_cover_scale_is_the_factor_fit_frames_resizes_by():
    assert cover_scale((10, 10000), (64, 64)) == pytest.approx(6.4)   # the 10000x10 clip
    assert cover_scale((1080, 1920), (480, 832)) == pytest.approx(480 / 1080)
    assert cover_scale((480, 854), (720, 1280)) == pytest.approx(1.5)   # 480p into a 720p bucket


def test_motion_is_the_mean_consecutive_difference():
    video = torch.zeros(3, 4, 8, 8)
    assert motion(video) == 0.0 and motion(video[:, :1]) == 0.0
    video[:, 1:] = 0.5                                                  # one step of 0.5, then still
    assert motion(video) == pytest.approx(0.5 / 3)
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        motion(torch.zeros(4, 8, 8, 3, dtype=torch.uint8))


def test_histograms_and_cut_score():
    video = torch.linspace(-1, 1, 64).expand(3, 6, 8, 64).clone()      # a ramp: every luma bin filled
    hist = luma_histograms(video)
    assert hist.shape == (6, 32) and torch.allclose(hist.sum(-1), torch.ones(6)) and (hist > 0).all()
    assert histogram_distances(video).abs().max() == 0 and cut_score(video) == (0.0, 1)
    video[:, 4:] = -1                                                   # frame 4 on: black, another shot
    d = histogram_distances(video)
    assert d[3] == pytest.approx(1 - 1 / 32, abs=0.02) and d[[0, 1, 2, 4]].abs().max() == 0
    jump, t = cut_score(video)
    assert t == 4 and jump == pytest.approx(d[3].item())
    steady = torch.stack([torch.full((3, 8, 8), v) for v in torch.linspace(-0.9, 0.9, 6)], 1)
    assert cut_score(steady)[0] == 0.0       # every step jumps bins alike: steady change is no cut


# --------------------------------------------------------------------------- on files

def test_extreme_aspect_is_skipped_as_upscale(tmp_path):
    path = write_video(tmp_path / "sliver.webm", "vp9", 640, 8, 20, 16)   # 64-pixel bucket: 8x upscale
    err = _skip_reason(path)
    assert err.reason == "upscale" and "640x8" in err.detail and "8.00x" in err.detail and "max_upscale=2" in err.detail
    assert VideoDecoder(DecodeOptions(**OPTS, max_upscale=0)).load(path).video_CTHW.shape == (3, 9, 64, 64)
    assert VideoDecoder(DecodeOptions(**OPTS, max_upscale=8)).load(path).bucket == "1:1"


def test_still_picture_is_skipped_as_static(tmp_path):
    path = write_video(tmp_path / "still.webm", "vp9", 96, 64, 40, 24, pattern="static")
    err = _skip_reason(path)
    assert err.reason == "static" and "static_threshold=0.003" in err.detail
    moved = float(err.detail.split("differ by ")[1].split()[0])
    assert moved < 0.003
    assert VideoDecoder(DecodeOptions(**OPTS, static_threshold=0)).load(path).video_CTHW.shape[1] == 9


def test_hard_cut_is_skipped_as_scene_cut(tmp_path):
    path = write_video(tmp_path / "cut.webm", "vp9", 96, 64, 40, 24, pattern="cut")   # the cut at frame 20
    err = _skip_reason(path)
    assert err.reason == "scene_cut" and "source frame 21" in err.detail and "scene_cut_threshold=0.4" in err.detail
    assert VideoDecoder(DecodeOptions(**OPTS, scene_cut_threshold=0)).load(path).video_CTHW.shape[1] == 9


@pytest.mark.parametrize("fps,frames,bucket", [(8, 9, "1:1"), (16, 17, "auto"), (4, 5, "1:1")])
def test_moving_test_patterns_pass_every_filter(clips, fps, frames, bucket):
    decoder = VideoDecoder(DecodeOptions(fps=fps, frames=frames, short_side=64, bucket=bucket))
    for name in TEST_CLIPS:
        if name in clips and (name != "odd" or fps != 16):                 # odd holds 1.2 s: too short at 16 fps
            assert decoder.load(clips[name]).video_CTHW.shape[:2] == (3, frames), name


def test_filters_are_measured_on_distinct_frames(tmp_path):
    """Up-sampling 4 fps to 8 fps shows every frame twice: the repeats are no sign of a still picture."""
    path = write_video(tmp_path / "slow.webm", "vp9", 64, 64, 8, 4)
    clip = VideoDecoder(DecodeOptions(**OPTS, static_threshold=0, scene_cut_threshold=0)).load(path)
    assert clip.frame_indices == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    distinct = motion(clip.video_CTHW[:, ::2])
    assert motion(clip.video_CTHW) == pytest.approx(distinct / 2, rel=1e-5)
    VideoDecoder(DecodeOptions(**OPTS, static_threshold=0.75 * distinct)).load(path)   # accepted


def test_filter_options_are_checked():
    for bad, match in [(dict(max_upscale=0.5), "max_upscale=0.5 must be >= 1"),
                       (dict(static_threshold=-1), "static_threshold=-1"),
                       (dict(scene_cut_threshold=1.5), "scene_cut_threshold=1.5")]:
        with pytest.raises(ValueError, match=match):
            DecodeOptions(**bad)

"""Probing, frame selection, buckets, the PyAV and DALI-CPU backends, backend choice and DALI's errors."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from megatron_regdpo.data.decode import (BUCKETS, DecodeOptions, VideoDecoder, VideoInfo, bucket_hw, fit_frames,
                                         nearest_bucket, parse_preference, probe, select_frames)
from megatron_regdpo.data.decode.dali_backend import DaliDecoder, dali_available, explain_dali_error, nvdec_available
from megatron_regdpo.data.errors import BadInput, DecodeFailure
from megatron_regdpo.data.decode.synth import TEST_CLIPS as GOOD
from megatron_regdpo.data.decode.synth import claim_duration, write_video

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
OPTS = dict(fps=8, frames=9, short_side=64, bucket="1:1")


def _info(times, path="x.mp4"):
    return VideoInfo(path, "h264", 64, 64, tuple(times), None)


# --------------------------------------------------------------------------- probe

def test_probe_reads_codec_size_and_frame_times(clips):
    for name, (codec, _, w, h, n, fps) in GOOD.items():
        if name not in clips:
            continue
        info = probe(clips[name])
        assert (info.codec, info.width, info.height, info.num_frames) == (codec, w, h, n), name
        assert info.fps == pytest.approx(fps, rel=0.03), name   # webm stores ms timestamps
        assert info.frame_times_s[0] == 0.0


@pytest.mark.parametrize("name,reason", [("zero", "zero_length"), ("random", "corrupt"),
                                         ("audio_only", "no_video_stream")])
def test_probe_names_what_is_wrong(clips, name, reason):
    with pytest.raises(BadInput) as e:
        probe(clips[name])
    assert e.value.reason == reason and str(clips[name]) in str(e.value)


def test_truncated_file_counts_its_frames_and_is_skipped_when_they_are_too_few(clips):
    info = probe(clips["truncated"])                         # 40% of the bytes of 40 frames at 24 fps
    assert info.duration_untrusted and info.declared_duration_s == pytest.approx(40 / 24, abs=0.05)
    assert 1 < info.num_frames < 40
    with pytest.raises(BadInput) as e:                       # 9 frames at 8 fps need 1 s
        VideoDecoder(DecodeOptions(**OPTS)).load(clips["truncated"])
    assert e.value.reason == "truncated" and f"claims 1.67 s but holds {info.num_frames} frames" in e.value.detail


def test_container_claiming_100_s_is_decoded_by_counting_frames(tmp_path):
    path = claim_duration(write_video(tmp_path / "liar.mkv", "vp9", 64, 64, 20, 10, "matroska"), 100)
    info = probe(path)
    assert info.declared_duration_s == pytest.approx(100) and info.num_frames == 20 and info.duration_untrusted
    clip = VideoDecoder(DecodeOptions(**OPTS)).load(path)    # 9 frames at 8 fps: 1 s of its 2 s
    assert clip.video_CTHW.shape == (3, 9, 64, 64)
    assert clip.frame_indices == [math.ceil(i * 10 / 8 - 0.5) for i in range(9)]
    with pytest.raises(BadInput) as e:                       # 3 s wanted, the claim would cover it: truncated
        VideoDecoder(DecodeOptions(**{**OPTS, "frames": 25})).load(path)
    assert e.value.reason == "truncated" and "claims 100.00 s but holds 20 frames" in e.value.detail
    with pytest.raises(BadInput) as e:                       # longer than even the claim: too short
        VideoDecoder(DecodeOptions(**{**OPTS, "fps": 0.1, "frames": 13})).load(path)
    assert e.value.reason == "too_short"
    assert not probe(write_video(tmp_path / "honest.mkv", "vp9", 64, 64, 20, 10, "matroska")).duration_untrusted


# --------------------------------------------------------------------------- normalisation

def test_select_frames_takes_the_nearest_source_frame():
    info = _info([i / 30 for i in range(40)])                # 30 fps -> 16 fps
    # ties (t exactly between two frames, e.g. 7.5/30 s) go to the earlier frame, the one on screen at t
    assert select_frames(info, 16, 17) == [math.ceil(i * 30 / 16 - 0.5) for i in range(17)]
    assert select_frames(_info([i / 8 for i in range(9)]), 16, 5) == [0, 0, 1, 1, 2]   # up-sampling repeats
    vfr = _info([0.0, 0.1, 0.15, 0.5, 0.52, 1.0])           # variable frame rate: real timestamps count
    assert select_frames(vfr, 4, 5) == [0, 2, 3, 4, 5]


def test_select_frames_rejects_too_short_clips():
    with pytest.raises(BadInput, match="need a frame at 1.00 s") as e:
        select_frames(_info([i / 30 for i in range(20)]), 8, 9)
    assert e.value.reason == "too_short"


def test_bucket_sizes():
    assert bucket_hw("16:9", 480) == (480, 832)              # Wan2.1's published 480p size
    assert bucket_hw("16:9", 720) == (720, 1280) and bucket_hw("9:16", 720) == (1280, 720)
    assert bucket_hw("3:4", 720) == (960, 720) and bucket_hw("1:1", 64) == (64, 64)
    assert all(h % 16 == 0 and w % 16 == 0 for b in BUCKETS for h, w in [bucket_hw(b, 96)])
    assert [nearest_bucket(*s) for s in [(1920, 1080), (1080, 1920), (600, 800), (500, 520)]] == \
        ["16:9", "9:16", "3:4", "1:1"]
    with pytest.raises(ValueError, match="2:1"):
        bucket_hw("2:1", 480)
    with pytest.raises(ValueError, match="multiple of 16"):
        bucket_hw("1:1", 100)


def test_fit_frames_covers_then_center_crops():
    frames = torch.zeros(3, 40, 120, 3, dtype=torch.uint8)   # 3 frames, 120 wide: the middle third is white
    frames[:, :, 40:80] = 255
    out = fit_frames(frames, (16, 16))
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert out[:, :, :, 6:10].mean() == pytest.approx(1.0)  # the crop is centred on the white band
    with pytest.raises(ValueError, match="uint8"):
        fit_frames(frames.float(), (16, 16))


def test_decode_options_are_checked():
    with pytest.raises(ValueError, match="4k\\+1"):
        DecodeOptions(frames=80)
    with pytest.raises(ValueError, match="unknown backends"):
        DecodeOptions(prefer={"vp9": ("ffmpeg",)})
    assert parse_preference(["vp9=dali-cpu, pyav", "*=pyav"]) == {"vp9": ("dali-cpu", "pyav"), "*": ("pyav",)}
    with pytest.raises(ValueError, match="CODEC=BACKEND"):
        parse_preference(["vp9"])


def test_decode_options_from_the_data_config():
    from megatron_regdpo.config.schema import DataConfig

    opts = DecodeOptions.from_data_config(DataConfig())
    assert (opts.fps, opts.frames, opts.short_side, opts.bucket) == (16, 81, 480, "16:9")
    assert DecodeOptions.from_data_config(DataConfig(height=1280, width=720)).bucket == "9:16"
    with pytest.raises(ValueError, match="700 is not a bucket size"):
        DecodeOptions.from_data_config(DataConfig(height=480, width=700))


# --------------------------------------------------------------------------- backends

def test_every_codec_decodes_with_pyav(clips):
    decoder = VideoDecoder(DecodeOptions(**OPTS, prefer={"*": ("pyav",)}))
    for name in GOOD:
        if name == "odd" or name not in clips:
            continue
        clip = decoder.load(clips[name])
        assert clip.video_CTHW.shape == (3, 9, 64, 64) and clip.backend == "pyav", name
        assert clip.video_CTHW.abs().max() <= 1.0
        assert (clip.video_CTHW[:, 1:] - clip.video_CTHW[:, :-1]).abs().amax(dim=(0, 2, 3)).min() > 0.05, name


def test_odd_size_and_rate(clips):
    clip = VideoDecoder(DecodeOptions(fps=8, frames=9, short_side=64, bucket="auto")).load(clips["odd"])
    assert clip.bucket == "16:9" and clip.video_CTHW.shape == (3, 9, 64, 112)   # 95x63 is ~3:2 -> 16:9
    assert clip.frame_indices == [math.ceil(i * 12.5 / 8 - 0.5) for i in range(9)]


@needs_dali
@pytest.mark.parametrize("name", ["vp9", "vp8", "mjpeg"])
def test_dali_cpu_and_pyav_decode_the_same_frames(clips, name):
    """Same frames in the same order; the pixels differ only by YUV->RGB conversion details (chroma
    upsampling/rounding): measured mean |diff| ~1.5-1.9 uint8 units on these synthetic clips."""
    info = probe(clips[name])
    indices = select_frames(info, 8, 9)
    dali_THWC = DaliDecoder("cpu").decode(info.path, indices)
    pyav_THWC = VideoDecoder(DecodeOptions(**OPTS))._decode_with("pyav", info, indices)
    assert dali_THWC.shape == pyav_THWC.shape and dali_THWC.dtype == torch.uint8
    diff = (dali_THWC.float() - pyav_THWC.float()).abs()
    assert diff.mean() < 3.0, f"mean abs diff {diff.mean():.2f} uint8 units"
    # frame identity: each DALI frame is closest to the PyAV frame of the same index
    cross_TT = (dali_THWC.float().flatten(1)[:, None] - pyav_THWC.float().flatten(1)[None]).abs().mean(-1)
    assert torch.equal(cross_TT.argmin(1), torch.arange(len(indices)))


@needs_dali
def test_dali_errors_name_the_file_and_the_reason(clips):
    if "h264" not in clips:
        pytest.skip("no H.264 encoder in this PyAV build")
    with pytest.raises(DecodeFailure) as e:
        DaliDecoder("cpu").decode(clips["h264"], [0, 1], codec="h264")
    msg = str(e.value)
    assert str(clips["h264"]) in msg and "(h264)" in msg and "DALI cpu decoder" in msg
    assert "Failed to create video decoder" in msg          # DALI's own line is kept, after ours

    from nvidia.dali import fn, pipeline_def                # the reader's cryptic "num_shards_ <= Size()"

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def reader():
        return fn.experimental.readers.video(device="cpu", filenames=[str(clips["random"])], sequence_length=2)
    with pytest.raises(RuntimeError) as raw:
        reader().build()
    assert "num_shards_ <= Size()" in str(raw.value)
    msg = explain_dali_error(raw.value, clips["random"], "cpu")
    assert str(clips["random"]) in msg and "found no video it could open" in msg


@needs_dali
def test_backend_choice_is_per_codec_logged_and_falls_back(clips, caplog, monkeypatch):
    caplog.set_level(logging.INFO, "megatron_regdpo.data.decode")
    decoder = VideoDecoder(DecodeOptions(**OPTS, prefer={"vp9": ("dali-cpu", "pyav"), "h264": ("dali-cpu", "pyav"),
                                                         "*": ("pyav",)}))
    assert decoder.backends_for("vp9") == ["dali-cpu", "pyav"]
    assert decoder.backends_for("h264") == ["pyav"]          # DALI's CPU decoder cannot: not even tried
    assert decoder.load(clips["vp9"]).backend == "dali-cpu"
    assert "vp9.webm: codec vp9 -> dali-cpu" in caplog.text
    # a backend that fails on a file hands it to the next one
    import megatron_regdpo.data.decode.decoder as dec

    def broken(path, indices):
        raise DecodeFailure(f"{path}: simulated")
    monkeypatch.setattr(dec, "decode_pyav", broken)
    fallback = VideoDecoder(DecodeOptions(**OPTS, prefer={"vp9": ("pyav", "dali-cpu")}))
    assert fallback.load(clips["vp9"]).backend == "dali-cpu"
    assert "simulated" in caplog.text
    with pytest.raises(BadInput) as e:                        # nothing left: decode_error with every failure
        VideoDecoder(DecodeOptions(**OPTS, prefer={"*": ("pyav",)})).load(clips["vp9"])
    assert e.value.reason == "decode_error"


def test_codec_outside_the_preference_map_is_unsupported(clips):
    decoder = VideoDecoder(DecodeOptions(**OPTS, prefer={"vp9": ("pyav",)}))   # no "*": only VP9 allowed
    with pytest.raises(BadInput) as e:
        decoder.load(clips["vp8"])
    assert e.value.reason == "unsupported_codec" and "'vp8'" in str(e.value)


@pytest.mark.gpu
@pytest.mark.skipif(not nvdec_available(), reason="needs CUDA and nvidia-dali (NVDEC)")
def test_nvdec_matches_pyav(clips):
    for name in ("vp9", "h264"):
        if name not in clips:
            continue
        gpu = VideoDecoder(DecodeOptions(**OPTS, device="cuda")).load(clips[name])
        cpu = VideoDecoder(DecodeOptions(**OPTS, prefer={"*": ("pyav",)})).load(clips[name])
        assert gpu.backend == "dali-nvdec" and gpu.video_CTHW.is_cuda
        assert (gpu.video_CTHW.cpu() - cpu.video_CTHW).abs().mean() < 3.0 / 127.5

"""DALI never pads a clip that is shorter than the frames asked for, and NVDEC decodes on this process's GPU."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import megatron_regdpo.data.decode.dali_backend as dali_backend
import megatron_regdpo.data.decode.decoder as decoder_mod
from megatron_regdpo.data.decode import DecodeOptions, VideoDecoder, probe
from megatron_regdpo.data.decode.dali_backend import DaliDecoder, cuda_device_index, dali_available
from megatron_regdpo.data.decode.synth import write_video
from megatron_regdpo.data.errors import BadInput, DecodeFailure

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
OPTS = dict(fps=8, frames=9, short_side=64, bucket="1:1")
PAST_THE_END = [0, 9, 12, 15]  # 12 and 15 do not exist in a 10-frame clip


@pytest.fixture(scope="module")
def ten_frames(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("short") / "ten.webm", "vp9", 64, 48, 10, 10)


@needs_dali
def test_dali_raises_rather_than_padding_with_black(ten_frames):
    """DALI 2.4's default pad_mode='constant' returned 4 frames here, the last two all zero."""
    dali = DaliDecoder("cpu")
    with pytest.raises(DecodeFailure) as e:
        dali.decode(ten_frames, PAST_THE_END, codec="vp9")
    msg = str(e.value)
    assert str(ten_frames) in msg and "(vp9)" in msg and "4 frames up to frame 15" in msg
    assert "fewer frames than asked for" in msg and "index 12" in msg and "10 frames" in msg
    frames_THWC = dali.decode(ten_frames, [0, 9, 9])         # the same decoder works again after the error
    assert frames_THWC.shape == (3, 48, 64, 3) and frames_THWC[1:].float().mean() > 50


@needs_dali
def test_short_dali_read_goes_to_pyav_like_any_failure(ten_frames, caplog):
    caplog.set_level(logging.INFO, "megatron_regdpo.data.decode")
    decoder = VideoDecoder(DecodeOptions(**OPTS, prefer={"vp9": ("dali-cpu", "pyav")}))
    with pytest.raises(BadInput) as e:                        # PyAV cannot decode frame 12 either
        decoder.decode_frames(probe(ten_frames), PAST_THE_END)
    assert e.value.reason == "decode_error"
    assert "DALI cpu decoder, 4 frames up to frame 15" in e.value.detail and "PyAV decoded 10" in e.value.detail
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("DALI cpu decoder" in w for w in warnings) and any("PyAV" in w for w in warnings)


class _ShortPipe:
    """A DALI pipeline that hands back fewer frames than asked for (pad_mode='none', per one reading of the
    docs, returns a shorter sequence instead of raising)."""

    class _Tensor:
        def __init__(self, array):
            self.array = array

        def shape(self):
            return list(self.array.shape)

        def __array__(self, dtype=None, copy=None):
            return self.array

    def feed_input(self, name, data):
        if name == "frames":
            self.n = len(data[0]) - 1

    def run(self):
        return ([self._Tensor(np.zeros((self.n, 48, 64, 3), np.uint8))],)


def test_a_short_result_is_an_error_and_pyav_takes_over(ten_frames, caplog, monkeypatch):
    caplog.set_level(logging.INFO, "megatron_regdpo.data.decode")
    monkeypatch.setattr(decoder_mod, "dali_available", lambda: True)
    decoder = VideoDecoder(DecodeOptions(**OPTS, prefer={"vp9": ("dali-cpu", "pyav")}))
    short = DaliDecoder("cpu")
    short._pipe = _ShortPipe()
    decoder._dali[("cpu", None)] = short
    frames_THWC, backend = decoder.decode_frames(probe(ten_frames), [0, 4, 9])
    assert backend == "pyav" and frames_THWC.shape == (3, 48, 64, 3)
    assert f"{ten_frames} (vp9): DALI cpu decoder, 3 frames up to frame 9: got 2 frames" in caplog.text
    assert "ten.webm: codec vp9 -> pyav" in caplog.text


# --------------------------------------------------------------------------- the GPU NVDEC decodes on

def test_cuda_device_index_is_the_process_device_not_zero(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)   # e.g. set_device(LOCAL_RANK=3)
    assert cuda_device_index() == 3 and cuda_device_index("cuda") == 3
    assert cuda_device_index("cuda:1") == 1 and cuda_device_index(torch.device("cuda", 2)) == 2


def test_nvdec_decoder_is_built_on_the_current_device(monkeypatch, ten_frames):
    built = []

    class Recorder:
        def __init__(self, device, device_id=None):
            built.append((device, device_id))

        def decode(self, path, indices, codec=None):
            return torch.zeros(len(indices), 48, 64, 3, dtype=torch.uint8)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(decoder_mod, "DaliDecoder", Recorder)
    decoder = VideoDecoder(DecodeOptions(**OPTS, device="cuda"))
    info = probe(ten_frames)
    decoder._decode_with("dali-nvdec", info, [0, 1])
    decoder._decode_with("dali-nvdec", info, [2])             # reused, not rebuilt
    decoder._decode_with("dali-cpu", info, [0])
    assert built == [("gpu", 3), ("cpu", None)]
    # a DaliDecoder built directly also takes the current device rather than 0
    monkeypatch.setattr(dali_backend, "nvdec_available", lambda: True)
    assert dali_backend.DaliDecoder("gpu").device_id == 3

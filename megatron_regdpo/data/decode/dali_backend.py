"""DALI decoding of selected frames: NVDEC on a GPU (`gpu`), or DALI's CPU decoder (VP8/VP9/MJPEG only).

One pipeline is built per decoder and reused for every file (external_source feeds the bytes and the frame
indices). DALI's own errors are cryptic and its real cause is often only logged to stderr, so
`explain_dali_error` turns them into a message that names the file and the likely reason.

DALI never pads: `decoders.video` pads indices past the end with black frames by default (pad_mode='constant',
applied to `frames` too, whatever its docs say). With 'none' such an index is an error, which the caller
treats like any backend failure (the next backend, PyAV, is tried); a short result is checked as well.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from megatron_regdpo.data.errors import DecodeFailure

DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_NVDEC_CODECS = frozenset({"h264", "hevc", "av1", "vp8", "vp9", "mjpeg", "mpeg4"})

# (substring of DALI's message, what it means for the user)
_KNOWN_ERRORS = (
    ("does not support empty input", "the file is empty"),
    ("is not supported by the CPU variant", "DALI's CPU decoder cannot decode this codec (VP8/VP9/MJPEG only)"),
    ("Failed to create video decoder", "DALI could not open a decoder for it: a codec this device cannot "
                                       "decode here, or a corrupt container"),
    ("num_shards_ <= Size()", "the reader found no video it could open: the file is empty, corrupt, or in a "
                              "codec this DALI device cannot decode"),
    ("Invalid data found", "the container is corrupt or not a video"),
    ("out of memory", "out of memory while decoding"),
    ("out-of-bounds frame index", "the clip has fewer frames than asked for (DALI would pad them with black)"),
)


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def nvdec_available() -> bool:
    return dali_available() and torch.cuda.is_available()


def cuda_device_index(device: str | torch.device = "cuda") -> int:
    """The CUDA device this process decodes on: an explicit "cuda:N", else torch's current device (the one
    the launcher's rank picked with set_device, and where `.to("cuda")` puts PyAV's frames), never just 0."""
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def explain_dali_error(exc: BaseException, path: str | Path, device: str, codec: str | None = None,
                       indices: list[int] | None = None) -> str:
    """One line naming the file, the codec, the frames asked for and the reason, with DALI's own line appended."""
    text = str(exc)
    reason = next((why for needle, why in _KNOWN_ERRORS if needle in text), "DALI failed")
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and "no longer valid" not in ln and not ln.strip().startswith("C++ context")]
    detail = next((ln for ln in lines if ln.startswith("Assert")), lines[-1] if lines else "")
    return f"{_where(path, device, codec, indices)}: {reason} [DALI: {detail[:200]}]"


def _where(path: str | Path, device: str, codec: str | None, indices: list[int] | None) -> str:
    codec_part = f" ({codec})" if codec else ""
    asked = f", {len(indices)} frames up to frame {max(indices)}" if indices else ""
    return f"{path}{codec_part}: DALI {device} decoder{asked}"


class DaliDecoder:
    """`decode(path, indices)` -> uint8 [T, H, W, 3] (on the GPU for device='gpu')."""

    def __init__(self, device: str = "cpu", num_threads: int = 2, device_id: int | None = None):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"DALI device {device!r} must be 'cpu' or 'gpu'")
        if device == "gpu" and not nvdec_available():
            raise ValueError("DALI device 'gpu' (NVDEC) needs CUDA and nvidia-dali; neither GPU nor NVDEC found")
        if device == "gpu" and device_id is None:
            device_id = cuda_device_index()
        self.device, self.num_threads, self.device_id = device, num_threads, device_id
        self.codecs = DALI_NVDEC_CODECS if device == "gpu" else DALI_CPU_CODECS
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device == "gpu"

        @pipeline_def(batch_size=1, num_threads=self.num_threads, device_id=self.device_id if gpu else None,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            # pad_mode='none': an index past the clip's end raises instead of returning a black frame
            return fn.decoders.video(encoded, device="mixed" if gpu else "cpu", frames=frames, pad_mode="none")

        p = pipe()
        p.build()
        return p

    def decode(self, path: str | Path, indices: list[int], codec: str | None = None) -> torch.Tensor:
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.feed_input("encoded", [np.fromfile(str(path), dtype=np.uint8)])
            self._pipe.feed_input("frames", [np.asarray(indices, dtype=np.int32)])
            (out,) = self._pipe.run()
        except RuntimeError as e:
            self._pipe = None  # after an error DALI says "Current pipeline object is no longer valid"
            raise DecodeFailure(explain_dali_error(e, path, self.device, codec, indices)) from None
        tensor = out[0]
        got = tensor.shape()[0]
        if got != len(indices):  # pad_mode='none' is documented to also mean "return a shorter sequence"
            raise DecodeFailure(f"{_where(path, self.device, codec, indices)}: got {got} frames, the clip "
                                f"is shorter (not padded)")
        if self.device == "cpu":
            return torch.from_numpy(np.array(tensor))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        frames_THWC = torch.empty(tensor.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
        feed_ndarray(tensor, frames_THWC, cuda_stream=torch.cuda.current_stream(self.device_id))
        return frames_THWC

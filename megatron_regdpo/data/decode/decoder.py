"""VideoDecoder: probe -> pick a backend for the codec -> decode the selected frames -> normalise -> filter.

The backend is chosen per file from a per-codec preference list (first capable and available backend
wins; a backend that fails on a file hands it to the next one). The choice is logged and returned.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_regdpo.data.errors import BadInput, DecodeFailure

from .dali_backend import (DALI_CPU_CODECS, DALI_NVDEC_CODECS, DaliDecoder, cuda_device_index, dali_available,
                           nvdec_available)
from .filters import cover_scale, cut_score, motion
from .normalize import bucket_hw, fit_frames, nearest_bucket, select_frames
from .probe import VideoInfo, probe
from .pyav_backend import decode_pyav

log = logging.getLogger("megatron_regdpo.data.decode")

BACKENDS = ("pyav", "dali-cpu", "dali-nvdec")
# Measured on the 2-core CPU machine (tools/bench_decode.py, docs/benchmarks.md): PyAV decodes and
# normalises VP8/VP9/MJPEG faster than DALI's CPU decoder, so DALI-CPU is the second choice there.
CPU_PREFERENCE: dict[str, tuple[str, ...]] = {
    **{c: ("pyav", "dali-cpu") for c in sorted(DALI_CPU_CODECS)}, "*": ("pyav",)}
# On a GPU, NVDEC first for everything it decodes; PyAV for the rest and as the fallback.
GPU_PREFERENCE: dict[str, tuple[str, ...]] = {
    **{c: ("dali-nvdec", "pyav") for c in sorted(DALI_NVDEC_CODECS)}, "*": ("pyav",)}


def parse_preference(items: list[str]) -> dict[str, tuple[str, ...]]:
    """["vp9=dali-cpu,pyav", "*=pyav"] -> {"vp9": ("dali-cpu", "pyav"), "*": ("pyav",)}."""
    out = {}
    for item in items:
        codec, sep, backends = item.partition("=")
        names = tuple(b.strip() for b in backends.split(",") if b.strip())
        if not sep or not codec.strip() or not names:
            raise ValueError(f"decoder preference {item!r} must look like CODEC=BACKEND[,BACKEND...]")
        out[codec.strip()] = names
    return out


@dataclass(frozen=True)
class DecodeOptions:
    fps: float = 16
    frames: int = 81            # Wan's VAE needs 4k+1
    short_side: int = 480       # pixels; the bucket's other side follows from its aspect
    bucket: str = "16:9"        # one of BUCKETS, or "auto" = the nearest aspect per clip
    min_short_side: int = 0     # skip clips whose source is smaller (the paper keeps >= 720)
    device: str = "cpu"         # "cpu", or "cuda" for NVDEC through DALI
    prefer: Mapping[str, tuple[str, ...]] | None = field(default=None)  # codec ("*" = any) -> backends
    # Filters that skip a clip (0 turns one off); the defaults' measurements are in filters.py's docstring.
    max_upscale: float = 2.0    # skip clips the bucket enlarges more (cover-resize factor): 360p -> 720p passes
    static_threshold: float = 0.003      # skip clips whose frames differ less (mean |diff|, [-1, 1] units)
    scene_cut_threshold: float = 0.4     # skip clips with a luma-histogram jump above this (0..1)

    def __post_init__(self):
        if self.frames < 1 or self.frames % 4 != 1:
            raise ValueError(f"frames={self.frames} is not 4k+1 (Wan's VAE keeps frame 0 and compresses the "
                             f"rest 4x): use e.g. {max(1, self.frames // 4 * 4 + 1)}")
        if self.fps <= 0:
            raise ValueError(f"fps={self.fps} must be positive")
        if self.bucket != "auto":
            bucket_hw(self.bucket, self.short_side)  # raises ValueError naming the bad value
        elif self.short_side % 16:
            raise ValueError(f"short_side={self.short_side} must be a multiple of 16")
        if self.max_upscale and self.max_upscale < 1:
            raise ValueError(f"max_upscale={self.max_upscale} must be >= 1 (or 0 to allow any upscale)")
        if not 0 <= self.static_threshold < 2:
            raise ValueError(f"static_threshold={self.static_threshold} must be in [0, 2) ([-1, 1] units; 0 = off)")
        if not 0 <= self.scene_cut_threshold < 1:
            raise ValueError(f"scene_cut_threshold={self.scene_cut_threshold} must be in [0, 1) (0 = off)")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be 'cpu' or 'cuda'")
        for codec, names in self.preference().items():
            bad = [n for n in names if n not in BACKENDS]
            if bad:
                raise ValueError(f"decoder preference for {codec!r} names unknown backends {bad}; known: {BACKENDS}")

    @classmethod
    def from_data_config(cls, data_cfg, **overrides) -> "DecodeOptions":
        """From the run config's `data` section: its fps and frames, and its (height, width) as the bucket."""
        h, w = data_cfg.height, data_cfg.width
        fields = dict(fps=data_cfg.fps, frames=data_cfg.frames, short_side=min(h, w), bucket=nearest_bucket(w, h))
        opts = cls(**{**fields, **overrides})
        sized_by_config = "bucket" not in overrides and "short_side" not in overrides
        if sized_by_config and bucket_hw(opts.bucket, opts.short_side) != (h, w):
            raise ValueError(f"data.height x data.width = {h}x{w} is not a bucket size; nearest: {opts.bucket} -> "
                             f"{bucket_hw(opts.bucket, opts.short_side)}")
        return opts

    def preference(self) -> Mapping[str, tuple[str, ...]]:
        if self.prefer is not None:
            return self.prefer
        return GPU_PREFERENCE if self.device == "cuda" else CPU_PREFERENCE

    def target(self, width: int, height: int) -> tuple[str, tuple[int, int]]:
        bucket = nearest_bucket(width, height) if self.bucket == "auto" else self.bucket
        return bucket, bucket_hw(bucket, self.short_side)


@dataclass
class Clip:
    video_CTHW: torch.Tensor    # float32 in [-1, 1]
    info: VideoInfo
    bucket: str
    backend: str
    frame_indices: list[int]


class VideoDecoder:
    def __init__(self, opts: DecodeOptions):
        self.opts = opts
        self._dali: dict[tuple[str, int | None], DaliDecoder] = {}  # (device, CUDA index) -> decoder

    def backends_for(self, codec: str) -> list[str]:
        """The preference list for `codec`, keeping the backends that can decode it on this machine."""
        pref = self.opts.preference()
        chain = pref.get(codec, pref.get("*", ()))
        return [b for b in chain if _capable(b, codec)]

    def load(self, path: str | Path, size_hw: tuple[int, int] | None = None) -> Clip:
        """The normalised clip of `path`, or BadInput; `size_hw` forces the output size (else the bucket's).

        A clip forced to a size (an imported negative, matched to its real clip) skips the content filters:
        a static or cut generated video is a loser worth keeping.
        """
        info = probe(path)
        if min(info.width, info.height) < self.opts.min_short_side:
            raise BadInput(path, "too_small", f"{info.width}x{info.height} is below the minimum short side "
                           f"{self.opts.min_short_side}")
        bucket, hw = ("fixed", size_hw) if size_hw else self.opts.target(info.width, info.height)
        scale = cover_scale((info.height, info.width), hw)
        if self.opts.max_upscale and scale > self.opts.max_upscale:
            raise BadInput(path, "upscale", f"{info.width}x{info.height} -> {bucket} {hw[1]}x{hw[0]} needs a "
                           f"{scale:.2f}x upscale, above max_upscale={self.opts.max_upscale:g}")
        indices = select_frames(info, self.opts.fps, self.opts.frames)
        frames_THWC, backend = self.decode_frames(info, indices)
        clip = Clip(fit_frames(frames_THWC, hw), info, bucket, backend, indices)
        if size_hw is None:
            self.check_content(clip)
        return clip

    def check_content(self, clip: Clip) -> None:
        """BadInput(static | scene_cut), measured on the distinct frames (a repeated source frame, from
        up-sampling a low frame rate, is no sign of a still picture)."""
        idx = clip.frame_indices
        distinct = [k for k in range(len(idx)) if k == 0 or idx[k] != idx[k - 1]]
        video_CTHW = clip.video_CTHW[:, distinct]
        opts, path = self.opts, clip.info.path
        if opts.static_threshold and len(distinct) > 1:
            moved = motion(video_CTHW)
            if moved < opts.static_threshold:
                raise BadInput(path, "static", f"near-static: consecutive frames differ by {moved:.4f} on average "
                               f"([-1, 1] units, {len(distinct)} distinct frames), below static_threshold="
                               f"{opts.static_threshold:g}")
        if opts.scene_cut_threshold:
            jump, t = cut_score(video_CTHW)
            if jump > opts.scene_cut_threshold:
                at_s = clip.info.frame_times_s[idx[distinct[t]]]
                raise BadInput(path, "scene_cut", f"hard cut at {at_s:.2f} s (source frame {idx[distinct[t]]}): "
                               f"luma histogram jump {jump:.3f}, above scene_cut_threshold="
                               f"{opts.scene_cut_threshold:g}")

    def decode_frames(self, info: VideoInfo, indices: list[int]) -> tuple[torch.Tensor, str]:
        chain = self.backends_for(info.codec)
        if not chain:
            pref = self.opts.preference()
            allowed = list(pref.get(info.codec, pref.get("*", ())))
            why = f"none of {allowed} can decode it here" if allowed else "the decoder preference map allows none"
            raise BadInput(info.path, "unsupported_codec", f"codec {info.codec!r}: {why}")
        failures = []
        for backend in chain:
            try:
                frames_THWC = self._decode_with(backend, info, indices)
            except DecodeFailure as e:
                log.warning("%s", e)
                failures.append(str(e))
                continue
            log.info("%s: codec %s -> %s", Path(info.path).name, info.codec, backend)
            return frames_THWC, backend
        raise BadInput(info.path, "decode_error", " | ".join(failures))

    def _decode_with(self, backend: str, info: VideoInfo, indices: list[int]) -> torch.Tensor:
        if backend == "pyav":
            frames_THWC = decode_pyav(info.path, indices)
            return frames_THWC.to(self.opts.device) if self.opts.device == "cuda" else frames_THWC
        # NVDEC on this process's GPU (where PyAV's frames go too), not GPU 0 for every rank
        key = ("gpu", cuda_device_index(self.opts.device)) if backend == "dali-nvdec" else ("cpu", None)
        if key not in self._dali:
            self._dali[key] = DaliDecoder(key[0], device_id=key[1])
        return self._dali[key].decode(info.path, indices, info.codec)


def _capable(backend: str, codec: str) -> bool:
    if backend == "pyav":
        return _pyav_decodes(codec)
    if backend == "dali-cpu":
        return codec in DALI_CPU_CODECS and dali_available()
    return codec in DALI_NVDEC_CODECS and nvdec_available()


def _pyav_decodes(codec: str) -> bool:
    import av

    try:
        av.codec.Codec(codec, "r")
    except Exception:  # av raises UnknownCodecError (not exported under one name across versions)
        return False
    return True


__all__ = ["BACKENDS", "Clip", "DecodeOptions", "VideoDecoder", "parse_preference"]

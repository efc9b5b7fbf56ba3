"""Clip filters measured on the normalised frames: how much a clip is upscaled, whether it moves, whether it
holds a hard scene cut. Pure tensor math; VideoDecoder.load turns a failed check into BadInput.

All measures take video in [C, T, H, W] with values in [-1, 1] (what fit_frames returns), RGB.
Legend: C colour channels, T frames, H/W pixels, B histogram bins.

The defaults of DecodeOptions, and what they were measured against (synth.py clips, 9 frames at 8 fps,
17 at 16 fps and 5 at 4 fps, 64-pixel buckets; tests/unit/data/test_filters.py):
- max_upscale 2.0: a 480p source fits a 720p bucket (1.5x), 360p does (2.0x); the issue's 10000x10 clip
  into a 64-pixel bucket (6.4x) does not. The paper keeps >= 720p sources: that is min_short_side's job.
- static_threshold 0.003 (about 0.4 grey levels per pixel): identical frames through VP8/VP9/H.264 measure
  0.0003-0.002; the moving test patterns 0.33-0.77. Kept low (not measured on real data) so that small
  motion before a still background, a talking head, passes; so does an intra-only codec's quality ramp on a
  still picture (MJPEG: 0.009): raise it for such data.
- scene_cut_threshold 0.4: the moving test patterns jump at most 0.24, a cut to a dark, mirrored shot
  0.74-0.78. Steady fast motion moves every step alike, and only the jump over the median step counts.
"""
from __future__ import annotations

import torch

LUMA_BINS = 32
_LUMA_RGB = (0.299, 0.587, 0.114)  # BT.601: the luma the decoders' YUV planes carried


def cover_scale(src_hw: tuple[int, int], out_hw: tuple[int, int]) -> float:
    """The factor fit_frames resizes by: the smallest that covers `out_hw` (then it center-crops)."""
    (h, w), (out_h, out_w) = src_hw, out_hw
    return max(out_h / h, out_w / w)


def motion(video_CTHW: torch.Tensor) -> float:
    """Mean absolute difference between consecutive frames, in [-1, 1] units (0: a still picture).

    One frame pair at a time: the whole difference at 81 x 720p would be another gigabyte.
    """
    _check(video_CTHW)
    t = video_CTHW.shape[1]
    if t < 2:
        return 0.0
    total = sum(float((video_CTHW[:, i + 1] - video_CTHW[:, i]).abs().mean()) for i in range(t - 1))
    return total / (t - 1)


def luma_histograms(video_CTHW: torch.Tensor, bins: int = LUMA_BINS) -> torch.Tensor:
    """[T, B]: each frame's luma histogram, normalised to sum 1."""
    _check(video_CTHW)
    w = torch.tensor(_LUMA_RGB, dtype=video_CTHW.dtype, device=video_CTHW.device)
    luma_THW = torch.einsum("cthw,c->thw", video_CTHW, w).add_(1).mul_(bins / 2)  # [0, bins]
    idx_TN = luma_THW.flatten(1).long().clamp_(0, bins - 1)
    t, n = idx_TN.shape
    offsets_T1 = torch.arange(t, device=idx_TN.device)[:, None] * bins
    counts = torch.bincount((idx_TN + offsets_T1).flatten(), minlength=t * bins)
    return counts.view(t, bins).float() / n


def histogram_distances(video_CTHW: torch.Tensor) -> torch.Tensor:
    """[T-1]: total variation distance (0: same histogram, 1: disjoint) of consecutive frames' luma."""
    hist_TB = luma_histograms(video_CTHW)
    return 0.5 * (hist_TB[1:] - hist_TB[:-1]).abs().sum(-1)


def cut_score(video_CTHW: torch.Tensor) -> tuple[float, int]:
    """(jump, t): the largest histogram distance of consecutive frames over their median, in [0, 1], and the
    frame t it leads to. Over the median, so that steady fast motion (every step large) is no cut."""
    d = histogram_distances(video_CTHW)
    if d.numel() == 0:
        return 0.0, 0
    t = int(d.argmax())
    return float(d[t] - d.median()), t + 1


def _check(video_CTHW: torch.Tensor) -> None:
    if video_CTHW.ndim != 4 or video_CTHW.shape[0] != 3 or not video_CTHW.is_floating_point():
        raise ValueError(f"expected float video [3, T, H, W] in [-1, 1], got {video_CTHW.dtype} "
                         f"{tuple(video_CTHW.shape)}")


__all__ = ["LUMA_BINS", "cover_scale", "cut_score", "histogram_distances", "luma_histograms", "motion"]

"""Normalisation of a decoded clip, as the paper does it for winners and losers alike.

Frame selection: the frame shown at each target timestamp i/fps (nearest source frame), the first
`frames` of them (Wan wants 4k+1). Space: scale so the bucket's (H, W) is covered, center-crop to it.
Values: float in [-1, 1], laid out [C, T, H, W].

Legend: T frames, H/W pixels, C colour channels (RGB).
"""
from __future__ import annotations

import bisect
import math

import torch
import torch.nn.functional as F

from megatron_regdpo.data.errors import BadInput

from .filters import cover_scale
from .probe import VideoInfo

# Aspect buckets named width:height, as (h, w) ratios.
BUCKETS: dict[str, tuple[int, int]] = {"16:9": (9, 16), "9:16": (16, 9), "3:4": (4, 3), "1:1": (1, 1)}
# Wan2.1's published 480p sizes are not exact 16:9 (832 = 52 x 16, aspect 1.733): keep them.
_PUBLISHED = {("16:9", 480): (480, 832), ("9:16", 480): (832, 480)}
PIXEL_MULTIPLE = 16  # VAE stride 8 x DiT patch 2


def bucket_hw(bucket: str, short_side: int) -> tuple[int, int]:
    """Output (H, W) of `bucket` at `short_side` pixels; the long side rounded to a multiple of 16."""
    if bucket not in BUCKETS:
        raise ValueError(f"bucket {bucket!r} is not one of {sorted(BUCKETS)} (or 'auto')")
    if short_side <= 0 or short_side % PIXEL_MULTIPLE:
        raise ValueError(f"short side {short_side} must be a positive multiple of {PIXEL_MULTIPLE}")
    if (bucket, short_side) in _PUBLISHED:
        return _PUBLISHED[bucket, short_side]
    rh, rw = BUCKETS[bucket]
    long_side = round(short_side * max(rh, rw) / min(rh, rw) / PIXEL_MULTIPLE) * PIXEL_MULTIPLE
    return (short_side, long_side) if rh <= rw else (long_side, short_side)


def nearest_bucket(width: int, height: int) -> str:
    """The bucket whose aspect is closest to width/height (in log ratio, so 2:1 and 1:2 are symmetric)."""
    aspect = math.log(width / height)
    return min(BUCKETS, key=lambda b: abs(math.log(BUCKETS[b][1] / BUCKETS[b][0]) - aspect))


def select_frames(info: VideoInfo, fps: float, frames: int) -> list[int]:
    """Source frame index shown at each target time i/fps, i < frames; BadInput if the frames run out:
    truncated where the container claims enough time (probe found fewer frames), else too_short."""
    times = info.frame_times_s
    need_s = (frames - 1) / fps
    # The last target must fall within the last source frame's display time (half an interval of slack
    # so that e.g. a 30 fps clip of exactly the needed length is not rejected by rounding).
    if not times or need_s > times[-1] + 0.5 * info.frame_interval_s + 1e-6:
        have = (f"the last of its {info.num_frames} frames ({info.fps:.3g} fps) is at "
                f"{times[-1] if times else 0:.2f} s")
        claimed = info.declared_duration_s
        if info.duration_untrusted and claimed is not None and claimed >= need_s:
            raise BadInput(info.path, "truncated", f"the container claims {claimed:.2f} s but holds "
                           f"{info.num_frames} frames; {frames} frames at {fps:g} fps need a frame at "
                           f"{need_s:.2f} s and {have}")
        raise BadInput(info.path, "too_short", f"{frames} frames at {fps:g} fps need a frame at {need_s:.2f} s; {have}")
    picked = []
    for i in range(frames):
        t = i / fps
        j = bisect.bisect_left(times, t)
        if j == len(times) or (j > 0 and t - times[j - 1] <= times[j] - t):
            j -= 1
        picked.append(j)
    return picked


def fit_frames(frames_THWC: torch.Tensor, size_hw: tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """uint8 [T, H', W', 3] -> float32 [3, T, H, W] in [-1, 1]: cover-resize (antialiased), center-crop.

    Resizes in uint8 (torch's fast antialiased path) `chunk` frames at a time to bound memory at 1080p+.
    """
    if frames_THWC.dtype != torch.uint8 or frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames_THWC.dtype} {tuple(frames_THWC.shape)}")
    t, h, w, _ = frames_THWC.shape
    out_h, out_w = size_hw
    scale = cover_scale((h, w), size_hw)
    rh, rw = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    top, left = (rh - out_h) // 2, (rw - out_w) // 2
    out_CTHW = torch.empty(3, t, out_h, out_w, dtype=torch.float32, device=frames_THWC.device)
    for s in range(0, t, chunk):
        x_NCHW = frames_THWC[s:s + chunk].permute(0, 3, 1, 2)
        if (rh, rw) != (h, w):
            if x_NCHW.device.type != "cpu":  # the uint8 antialiased kernel is CPU-only
                x_NCHW = x_NCHW.float()
            x_NCHW = F.interpolate(x_NCHW.contiguous(memory_format=torch.channels_last), size=(rh, rw),
                                   mode="bilinear", antialias=True, align_corners=False)
        x_NCHW = x_NCHW[:, :, top:top + out_h, left:left + out_w]
        out_CTHW[:, s:s + chunk].copy_(x_NCHW.permute(1, 0, 2, 3))  # cast and transpose in one pass
    return out_CTHW.mul_(2 / 255).sub_(1.0)

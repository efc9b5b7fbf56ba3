"""Probe a video with PyAV by demuxing its packets (no decoding): codec, size and every frame's time.

This is the first gate for bad input (empty, unreadable, audio-only files) and the source of the frame
times that frame selection needs, exact also for variable-frame-rate files. The frames are counted, never
trusted from the header: a container that declares more time than its packets hold (a truncated download,
or a muxer that wrote a wrong duration) is marked `duration_untrusted`, and frame selection decides whether
the frames that are there suffice (else it skips the clip as truncated).
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

from megatron_regdpo.data.errors import BadInput

log = logging.getLogger("megatron_regdpo.data.decode")


@dataclass(frozen=True)
class VideoInfo:
    path: str
    codec: str                        # canonical codec name: h264, hevc, av1, vp9, vp8, mjpeg, ...
    width: int
    height: int
    frame_times_s: tuple[float, ...]  # presentation times, ascending, the first frame at 0.0
    declared_duration_s: float | None
    duration_untrusted: bool = False  # the declared duration exceeds the packets' span: it was ignored

    @property
    def num_frames(self) -> int:
        return len(self.frame_times_s)

    @property
    def frame_interval_s(self) -> float:
        t = self.frame_times_s
        return statistics.median(b - a for a, b in zip(t, t[1:])) if len(t) > 1 else 0.0

    @property
    def fps(self) -> float:
        return 1.0 / self.frame_interval_s if self.frame_interval_s > 0 else 0.0

    @property
    def span_s(self) -> float:
        """Time covered by the frames, the last frame's display time included."""
        return (self.frame_times_s[-1] + self.frame_interval_s) if self.frame_times_s else 0.0


def probe(path: str | Path) -> VideoInfo:
    """VideoInfo of `path`, or BadInput(zero_length | corrupt | no_video_stream | truncated: demuxing failed)."""
    import av

    path = Path(path)
    if path.stat().st_size == 0:
        raise BadInput(path, "zero_length", "the file is empty (0 bytes)")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise BadInput(path, "corrupt", f"PyAV cannot open it as a video container ({e})") from None
    with container:
        if not container.streams.video:
            raise BadInput(path, "no_video_stream", f"no video stream (streams: "
                           f"{[s.type for s in container.streams] or 'none'})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        codec, width, height = ctx.codec.canonical_name, ctx.width, ctx.height
        try:
            packets = [(p.pts, p.dts) for p in container.demux(stream) if p.size > 0]
        except av.FFmpegError as e:
            raise BadInput(path, "truncated", f"demuxing failed part way ({e})") from None
        declared = _declared_duration(container, stream)
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        time_base = float(stream.time_base) if stream.time_base else None
    if not packets or width <= 0 or height <= 0:
        raise BadInput(path, "corrupt", f"no decodable video packets ({codec}, {width}x{height})")
    times = _frame_times(packets, time_base, rate)
    info = VideoInfo(str(path), codec, width, height, times, declared)
    if declared is not None and info.num_frames > 1:
        missing_s = declared - info.span_s
        if missing_s > max(2 * info.frame_interval_s, 0.05 * declared):
            log.info("%s: the container declares %.2f s but its %d frames span %.2f s: the frames count",
                     path, declared, info.num_frames, info.span_s)
            info = VideoInfo(str(path), codec, width, height, times, declared, duration_untrusted=True)
    return info


def _frame_times(packets, time_base: float | None, rate: float) -> tuple[float, ...]:
    stamps = [pts if pts is not None else dts for pts, dts in packets]
    if time_base and all(s is not None for s in stamps):
        seconds = sorted(s * time_base for s in stamps)
    elif rate > 0:  # raw streams without timestamps: constant rate
        seconds = [i / rate for i in range(len(stamps))]
    else:
        seconds = [float(i) for i in range(len(stamps))]
    return tuple(s - seconds[0] for s in seconds)


def _declared_duration(container, stream) -> float | None:
    """The duration the file claims for the video, when it claims one we can trust."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    # The container's duration covers all streams: only meaningful when the video is alone.
    if container.duration and len(container.streams) == 1:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None

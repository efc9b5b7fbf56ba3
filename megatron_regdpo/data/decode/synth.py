"""Synthetic test videos written with PyAV: smooth moving content, every frame different and identifiable.

Also the content the clip filters must reject (PATTERNS: a still picture, a hard cut) and a container whose
declared duration lies (`claim_duration`).

Used by the tests, the demo and tools/bench_decode.py. `ENCODERS` maps a codec to the FFmpeg encoders that
can write it, in order; `encoder_for` says which one this PyAV build has (None if none).
"""
from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import numpy as np

ENCODERS = {
    "vp9": (("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}),),
    "vp8": (("libvpx", {"deadline": "realtime", "cpu-used": "8"}),),
    "mjpeg": (("mjpeg", {}),),
    "h264": (("libx264", {"preset": "ultrafast"}), ("libopenh264", {}), ("h264", {})),
    "hevc": (("libx265", {"preset": "ultrafast", "x265-params": "log-level=none"}), ("hevc", {})),
    "av1": (("libsvtav1", {"preset": "12"}), ("libaom-av1", {"cpu-used": "8"})),
    "ffv1": (("ffv1", {}),),
}
_PIX_FMT = {"mjpeg": "yuvj420p"}


def encoder_for(codec: str) -> tuple[str, dict] | None:
    import av

    for name, options in ENCODERS.get(codec, ()):
        try:
            av.codec.Codec(name, "w")
        except Exception:  # UnknownCodecError
            continue
        return name, options
    return None


def frame_pattern(i: int, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3]: gradients plus a bright bar that moves 3 rows per frame (so frames are distinct)."""
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    phase = 0.15 * i
    rgb = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (x + phase)) + 0 * y,
                    0.5 + 0.4 * np.cos(2 * np.pi * (y + 0.5 * phase)) + 0 * x,
                    np.full((height, width), (i * 0.037) % 1.0, np.float32)], axis=-1)
    img = (rgb * 255).astype(np.uint8)
    row = (3 * i) % max(1, height - 4)
    img[row:row + 4] = 255
    return img


def pattern_frame(pattern: str, i: int, frames: int, width: int, height: int) -> np.ndarray:
    """Frame i of `frames` of a PATTERNS content: "moving" (frame_pattern), "static" (its frame 0 throughout)
    or "cut" (frame_pattern, then from the middle on a dark, horizontally mirrored version: another shot)."""
    if pattern == "moving":
        return frame_pattern(i, width, height)
    if pattern == "static":
        return frame_pattern(0, width, height)
    if pattern == "cut":
        img = frame_pattern(i, width, height)
        return img if i < frames // 2 else (img[:, ::-1] // 4).copy()
    raise ValueError(f"pattern {pattern!r} is not one of {PATTERNS}")


PATTERNS = ("moving", "static", "cut")


def write_video(path: str | Path, codec: str, width: int, height: int, frames: int, fps: float,
                container_format: str | None = None, pattern: str = "moving") -> Path:
    """Write `frames` frames of `pattern` (PATTERNS) at `fps`; ValueError if this PyAV has no encoder for `codec`."""
    import av

    enc = encoder_for(codec)
    if enc is None:
        raise ValueError(f"no encoder for codec {codec!r} in this PyAV build (tried "
                         f"{[n for n, _ in ENCODERS.get(codec, ())]})")
    name, options = enc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(name, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width, height
        stream.pix_fmt = _PIX_FMT.get(codec, "yuv420p")
        stream.options = dict(options)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(pattern_frame(pattern, i, frames, width, height), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def claim_duration(path: str | Path, seconds: float) -> Path:
    """Rewrite the duration a Matroska/WebM file declares (its Segment Info Duration, a float in ms at the
    default timecode scale) to `seconds`, leaving the frames alone: a container whose header lies."""
    import av

    path = Path(path)
    with av.open(str(path)) as c:
        declared_ms = c.duration / 1000 if c.duration else None
    data = bytearray(path.read_bytes())
    for tag, fmt in ((b"\x44\x89\x88", ">d"), (b"\x44\x89\x84", ">f")):  # ID 0x4489, an 8- or 4-byte float
        at = data.find(tag)
        if at >= 0 and declared_ms is not None:
            value, = struct.unpack_from(fmt, data, at + len(tag))
            if abs(value - declared_ms) <= 1:
                struct.pack_into(fmt, data, at + len(tag), seconds * 1000)
                path.write_bytes(bytes(data))
                return path
    raise ValueError(f"{path}: no Matroska Duration element declaring {declared_ms} ms found (write it as "
                     f"Matroska or WebM)")


# name -> (codec, extension, width, height, frames, fps): a small set for tests and demos, each long enough
# for 9 frames at 8 fps, with odd sizes and rates; `make_test_clips` adds broken files beside them.
TEST_CLIPS = {
    "vp9": ("vp9", "webm", 96, 64, 40, 24),
    "vp8": ("vp8", "webm", 96, 64, 40, 30000 / 1001),
    "mjpeg": ("mjpeg", "avi", 64, 96, 30, 25),
    "h264": ("h264", "mp4", 80, 64, 40, 30),
    "odd": ("vp9", "webm", 95, 63, 16, 12.5),
}


def write_audio_only(path: str | Path) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mp2", rate=44100)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1152
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return Path(path)


def make_test_clips(folder: str | Path, names=tuple(TEST_CLIPS)) -> dict[str, Path]:
    """TEST_CLIPS whose encoder this PyAV has (the others are absent) + truncated, random, zero, audio_only."""
    import random

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {name: write_video(folder / f"{name}.{ext}", codec, w, h, n, fps)
           for name, (codec, ext, w, h, n, fps) in TEST_CLIPS.items() if name in names and encoder_for(codec)}
    data = write_video(folder / "truncated.webm", "vp9", 96, 64, 40, 24).read_bytes()
    (folder / "truncated.webm").write_bytes(data[: len(data) * 2 // 5])
    # Seeded, not os.urandom: of 5000 random 4 KiB blocks FFmpeg 8.1 opened 22 as a subtitle stream
    # ("no_video_stream") and 1 as a video; the fixture must be the same bytes, read as "corrupt", every run.
    (folder / "random.mp4").write_bytes(random.Random(4096).randbytes(4096))
    (folder / "zero.mp4").write_bytes(b"")
    out.update(truncated=folder / "truncated.webm", random=folder / "random.mp4", zero=folder / "zero.mp4",
               audio_only=write_audio_only(folder / "audio_only.mp2"))
    return out

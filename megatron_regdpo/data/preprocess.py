"""Preprocessing: a folder of captioned videos -> real-clip latents, text embeddings (and I2V image
conditioning) in a GT-Pair store. Resumable; bad inputs are skipped and reported, never half-written.

Per clip, everything is computed in memory first (decode, normalise, VAE, text, CLIP); only then are its
arrays written and the clip committed (text first, as its own commit, shared by clips with one caption).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .decode import DecodeOptions, VideoDecoder
from .encode import Encoders, ModelPaths, load_encoders
from .errors import BadInput, SkipReport
from .inputs import InputVideo, find_inputs
from .progress import progress
from .store import GTPairStore, prompt_id

# Wan2.1's default negative prompt (used for classifier-free guidance when the negatives are sampled).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
REPORT_FILE = "skipped.jsonl"


@dataclass(frozen=True)
class PreprocessOptions:
    input_dir: str
    store: str
    models: ModelPaths
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    task: str = "t2v"                    # "t2v" or "i2v" (adds the CLIP embedding and first-frame condition)
    text_len: int = 512
    latent_dtype: str = "bf16"           # how latents/embeddings are stored: bf16 | fp16 | fp32
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    report: str | None = None            # JSONL of skipped inputs; default <store>/skipped.jsonl
    device: str = "cpu"
    limit: int | None = None             # try at most this many inputs not yet in the store (smoke runs)
    show_progress: bool = True

    def __post_init__(self):
        if self.task not in ("t2v", "i2v"):
            raise ValueError(f"task={self.task!r} must be 't2v' or 'i2v'")
        if self.latent_dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"latent_dtype={self.latent_dtype!r} must be bf16, fp16 or fp32")


@dataclass
class PreprocessSummary:
    added: int
    already: int
    skipped: SkipReport
    backends: Counter
    store_real: int
    seconds: float

    def format(self) -> str:
        used = ", ".join(f"{b} {n}" for b, n in sorted(self.backends.items())) or "none"
        return (f"added {self.added} real clips in {self.seconds:.1f} s (decoders: {used}); "
                f"{self.already} already in the store; {self.skipped.summary()}; "
                f"store has {self.store_real} real clips")


def store_attrs(opts: PreprocessOptions, encoders: Encoders) -> dict:
    d = opts.decode
    return {"task": opts.task, "fps": d.fps, "frames": d.frames, "short_side": d.short_side, "bucket": d.bucket,
            "latent_dtype": opts.latent_dtype, "text_len": opts.text_len, "pixel_range": [-1, 1],
            "frame_selection": "nearest source frame to each i/fps from the first frame; cover-resize, center-crop",
            "negative_prompt_id": prompt_id(opts.negative_prompt), **encoders.describe()}


def preprocess(opts: PreprocessOptions) -> PreprocessSummary:
    start = time.monotonic()
    inputs = find_inputs(opts.input_dir)
    encoders = load_encoders(opts.models, opts.task, opts.text_len, opts.device)
    store = GTPairStore.open_or_create(opts.store, store_attrs(opts, encoders))
    report_path = Path(opts.report) if opts.report else Path(opts.store) / REPORT_FILE
    report_path.unlink(missing_ok=True)  # bad inputs are retried every run, so the report is per run
    report, backends, decoder = SkipReport(report_path), Counter(), VideoDecoder(opts.decode)
    _ensure_text(store, encoders, opts.negative_prompt)
    pending = [v for v in inputs if not store.committed("real", v.sample_id)]
    already = len(inputs) - len(pending)
    if opts.limit is not None:
        pending = pending[:opts.limit]
    for video in progress(pending, total=len(pending), desc="preprocess", enabled=opts.show_progress):
        sample = report.attempt(video.path, "preprocess", encode_clip, video, decoder, encoders, store, opts)
        if sample is None:
            continue
        _ensure_text(store, encoders, video.caption, sample.pop("text"))
        store.write_real(video.sample_id, sample.pop("latents"), sample.pop("record"), **sample)
        backends[store.records["real"][video.sample_id]["backend"]] += 1
    store.finalize()
    return PreprocessSummary(sum(backends.values()), already, report, backends,
                             len(store.records["real"]), time.monotonic() - start)


def encode_clip(video: InputVideo, decoder: VideoDecoder, enc: Encoders, store: GTPairStore,
                opts: PreprocessOptions) -> dict:
    """Everything one real clip contributes, computed before anything is written."""
    path, caption = video.path, video.caption
    if not caption:
        raise BadInput(path, "no_caption", f"no {path.with_suffix('.txt').name} and no captions.jsonl entry "
                       f"(or the caption is empty)")
    clip = decoder.load(path)
    video_BCTHW = clip.video_CTHW[None]
    pid = prompt_id(caption)
    info = clip.info
    out = {"latents": enc.vae.encode(video_BCTHW)[0],
           "text": None if store.committed("text", pid) else enc.text.encode([caption]),
           "record": {"prompt_id": pid, "source": str(path), "codec": info.codec, "backend": clip.backend,
                      "bucket": clip.bucket, "size": list(video_BCTHW.shape[-2:]),
                      "source_size": [info.width, info.height], "source_fps": round(info.fps, 3),
                      "source_frames": info.num_frames}}
    if opts.task == "i2v":
        first_BCHW = video_BCTHW[:, :, 0]
        out["image_IE"] = enc.image.encode(first_BCHW)[0]
        out["cond_CFhw"] = enc.vae.i2v_condition(first_BCHW, opts.decode.frames)[0]
    return out


def _ensure_text(store: GTPairStore, enc: Encoders, caption: str,
                 encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    pid = prompt_id(caption)
    if store.committed("text", pid):
        return
    emb_BTE, mask_BT = encoded if encoded is not None else enc.text.encode([caption])
    store.write_text(pid, emb_BTE[0], mask_BT[0], caption)

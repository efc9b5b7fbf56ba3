"""Negatives made elsewhere: a folder `<generator>/<real_id>.<ext>` of videos from other generators (the paper
used five). Each is decoded and normalised exactly like its real clip (same fps, frame count and output
size), VAE-encoded, and committed as negative k=0 of that generator. Bad files are skipped and reported.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from megatron_regdpo.data.decode import DecodeOptions, VideoDecoder
from megatron_regdpo.data.encode import WanVAE
from megatron_regdpo.data.errors import BadInput, SkipReport
from megatron_regdpo.data.inputs import VIDEO_EXTS
from megatron_regdpo.data.progress import progress
from megatron_regdpo.data.store import GTPairStore, safe_id

from .generate import negative_id


def decode_options_of(attrs: dict, device: str = "cpu") -> DecodeOptions:
    return DecodeOptions(fps=attrs["fps"], frames=attrs["frames"], short_side=attrs["short_side"],
                         bucket=attrs["bucket"], device=device)


def import_negatives(store: GTPairStore, folder: str | Path, vae: WanVAE, report: SkipReport,
                     decode: DecodeOptions | None = None, show_progress: bool = True) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"negatives folder {folder} does not exist")
    decoder = VideoDecoder(decode or decode_options_of(store.attrs))
    videos = sorted(p for p in folder.glob("*/*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS)
    made, already, per_generator = 0, 0, Counter()
    start = time.monotonic()
    for path in progress(videos, total=len(videos), desc="import negatives", enabled=show_progress):
        generator, real_id = path.parent.name, safe_id(path.stem)
        gid = negative_id(real_id, generator, 0)
        if store.committed("generated", gid):
            already += 1
            continue
        encoded = report.attempt(path, "import_negatives", _encode_negative, path, real_id, store, decoder, vae)
        if encoded is None:
            continue
        clip, latents_CFhw = encoded
        store.write_generated(gid, latents_CFhw, {"real_id": real_id, "generator": generator, "k": 0,
                                                  "source": str(path), "codec": clip.info.codec,
                                                  "backend": clip.backend})
        made += 1
        per_generator[generator] += 1
    store.finalize()
    return {"imported": made, "already": already, "skipped": report.total, "per_generator": dict(per_generator),
            "seconds": round(time.monotonic() - start, 2)}


def _encode_negative(path: Path, real_id: str, store: GTPairStore, decoder: VideoDecoder, vae: WanVAE):
    """Decoded like its real clip (same size, fps and frame count), then VAE-encoded."""
    real = store.records["real"].get(real_id)
    if real is None:
        raise BadInput(path, "no_real_clip", f"no real clip {real_id!r} in {store.path}")
    clip = decoder.load(path, size_hw=tuple(real["size"]))
    return clip, vae.encode(clip.video_CTHW[None])[0]

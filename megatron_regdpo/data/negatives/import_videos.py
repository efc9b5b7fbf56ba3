"""Negatives made elsewhere: a folder `<generator>/<real_id>.<ext>` of videos from other generators (the paper
used five). Each is decoded and normalised exactly like its real clip (same fps, frame count and output
size), VAE-encoded, and committed as negative k=0 of that generator. Bad files are skipped and reported.

Under torchrun the files are split over the ranks like preprocessing's clips (data/ranks.py): each is
encoded once, rank 0 commits after every round and writes every rank's skips; a rerun after a kill does
what is left. The store is the same whatever the number of ranks.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from megatron_regdpo.data.decode import DecodeOptions, VideoDecoder
from megatron_regdpo.data.encode import WanVAE
from megatron_regdpo.data.errors import BadInput, RoundReport
from megatron_regdpo.data.inputs import VIDEO_EXTS
from megatron_regdpo.data.progress import Bar
from megatron_regdpo.data.ranks import Job, rounds, shard
from megatron_regdpo.data.store import GTPairStore, safe_id

from .generate import negative_id


def decode_options_of(attrs: dict, device: str = "cpu") -> DecodeOptions:
    return DecodeOptions(fps=attrs["fps"], frames=attrs["frames"], short_side=attrs["short_side"],
                         bucket=attrs["bucket"], device=device)


def import_negatives(store: GTPairStore, folder: str | Path, vae: WanVAE, report: RoundReport,
                     decode: DecodeOptions | None = None, show_progress: bool = True, job: Job | None = None) -> dict:
    """Import every video of `folder` not yet in the store; every rank of `job` calls this (one process:
    job=None) and gets the counts of all ranks. Rank 0 lists the folder once for all ranks (a folder still
    being filled cannot give two ranks two lists). Two files naming one negative (the same generator and
    real id, e.g. clip.mp4 and clip.webm) are an input error: the one already imported, else the first in
    sorted order, is the negative; the others are skipped as `duplicate_negative`."""
    job, folder, start = job or Job(), Path(folder), time.monotonic()
    pending, duplicates, already = job.by_lead(lambda: _listing(folder, store))
    for path, detail in duplicates:   # every rank counts them; rank 0 (the report with a path) writes them down
        report.add(BadInput(path, "duplicate_negative", detail), "import_negatives")
    decoder = VideoDecoder(decode or decode_options_of(store.attrs))
    bar = Bar(len(pending), "import negatives", enabled=show_progress and job.lead)
    per_generator, mine = Counter(), shard(pending, job)
    for i in range(rounds(len(pending), job)):
        outcome = None   # this rank's file of the round: ("imported", generator) or ("skip", report.last)
        if i < len(mine):
            (path, gid), report.last = mine[i], None
            encoded = report.attempt(path, "import_negatives", _encode_negative, path, store, decoder, vae)
            if encoded is None:
                outcome = ("skip", report.last)
            else:
                clip, latents_CFhw = encoded
                store.write_generated(gid, latents_CFhw, {
                    "real_id": safe_id(path.stem), "generator": path.parent.name, "k": 0, "source": str(path),
                    "codec": clip.info.codec, "backend": clip.backend})
                outcome = ("imported", path.parent.name)
        job.end_round(store, outcome, per_generator, report, bar)
    job.finish(store, bar)
    return {"imported": sum(per_generator.values()), "already": already, "skipped": report.total,
            "per_generator": dict(per_generator), "seconds": round(time.monotonic() - start, 2)}


def _listing(folder: Path, store: GTPairStore) -> tuple[list, list, int]:
    """(pending [(path, negative id)], duplicates [(path, detail)], how many negatives are in already)."""
    if not folder.is_dir():
        raise ValueError(f"negatives folder {folder} does not exist")
    by_id: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.glob("*/*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS):
        by_id.setdefault(negative_id(safe_id(path.stem), path.parent.name, 0), []).append(path)
    pending, duplicates, already = [], [], 0
    for gid, paths in by_id.items():
        record = store.records["generated"].get(gid)
        kept = paths[0]
        if record is not None:
            already += 1
            source = Path(record.get("source") or "").name   # by name: --from may be spelled otherwise now
            kept = next((p for p in paths if p.name == source), kept)
        else:
            pending.append((kept, gid))
        duplicates += [(p, f"{kept.name} in the same folder is the {p.parent.name} negative of "
                           f"{safe_id(p.stem)!r}" + (" (imported already)" if record is not None else ""))
                       for p in paths if p != kept]
    return pending, sorted(duplicates), already


def _encode_negative(path: Path, store: GTPairStore, decoder: VideoDecoder, vae: WanVAE):
    """Decoded like its real clip (same size, fps and frame count), then VAE-encoded."""
    real_id = safe_id(path.stem)
    real = store.records["real"].get(real_id)
    if real is None:
        raise BadInput(path, "no_real_clip", f"no real clip {real_id!r} in {store.path}")
    clip = decoder.load(path, size_hw=tuple(real["size"]))
    return clip, vae.encode(clip.video_CTHW[None])[0]

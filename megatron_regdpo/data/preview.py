"""Look at the pairs: decode winners and losers with the store's VAE into side-by-side mp4 files.

One file per pair, `<real_id>__<generator>_<k>.mp4`: the real clip (winner) on the left, the negative (loser)
on the right, a thin white column between, at the store's fps, H.264 (mpeg4 where this PyAV has no H.264
encoder). `index.json` beside them lists each file with its ids and caption; it is rewritten after every file,
so an interrupted run leaves an index of what exists. A rerun replaces the previews it listed and refuses a
folder that holds anything else (it never deletes files it did not write).

Legend: B batch, C channels, F latent frames, h/w latent height/width, T frames, H/W pixel height/width.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .decode.synth import encoder_for
from .encode.vae import WanVAE
from .store import GTPairStore, PairEntry, safe_id

INDEX = "index.json"
FORMAT = "megatron_regdpo.previews"
SEPARATOR = 4  # pixels of white between winner and loser (even, so the width stays even for yuv420p)
H264_QUALITY = {"libx264": {"crf": "18"}}  # visually near-lossless; the other encoders keep their defaults
MPEG4 = ("mpeg4", {})
log = logging.getLogger("megatron_regdpo.data")


@dataclass
class PreviewResult:
    out_dir: Path
    files: list[Path]       # in the order written, one per pair
    encoder: str            # the FFmpeg encoder used: libx264 (or another H.264 encoder), else mpeg4
    pairs_in_store: int     # pairs to choose from (after the generator filter)


def write_previews(store: GTPairStore, out_dir: str | Path, n: int = 8, vae: WanVAE | None = None,
                   device: str = "cpu", generator: str | None = None) -> PreviewResult:
    """Decode up to `n` pairs of `store` (the first negative of every real clip, then the second, ...) into
    side-by-side videos in `out_dir`; the VAE is loaded from the store's attrs["vae"]["path"] unless given."""
    if n < 1:
        raise ValueError(f"n={n}: want at least one preview")
    entries = store.pair_index() or store.pair_entries()  # the log's pairs when finalize has not run yet
    if not entries:
        raise ValueError(f"store {store.path} has no pairs: run tools/make_gt_pairs.py generate (or import) first")
    if generator is not None:
        known = sorted({e.generator for e in entries})
        entries = [e for e in entries if e.generator == generator]
        if not entries:
            raise ValueError(f"store {store.path} has no negatives from generator {generator!r} (it has {known})")
    chosen = spread(entries, n)
    out_dir = Path(out_dir)
    old = previous_files(out_dir)
    vae = load_store_vae(store, device) if vae is None else vae
    check_vae_fits(vae, store)
    encoder = preview_encoder()
    fps = float(store.attrs["fps"])
    for name in old:  # the previews of the last run (only those: anything else made previous_files refuse)
        (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "store": str(store.path.resolve()), "encoder": encoder[0], "fps": fps,
             "layout": f"winner left, loser right, {SEPARATOR}px white column between", "previews": []}
    write_json(out_dir / INDEX, index)  # lists nothing yet: the old files are gone
    files = []
    for e in chosen:
        k = store.records["generated"][e.generated_id].get("k", 0)
        path = out_dir / f"{e.real_id}__{safe_id(e.generator)}_{k}.mp4"
        assert path not in files, f"two pairs would both write {path}"
        winner_TCHW = to_uint8(vae.decode(store.read_latents("real", e.real_id)[None])[0])
        loser_TCHW = to_uint8(vae.decode(store.read_latents("generated", e.generated_id)[None])[0])
        frames_THWC = side_by_side(winner_TCHW, loser_TCHW)
        write_video(path, frames_THWC, fps, encoder)
        files.append(path)
        index["previews"].append({
            "file": path.name, "real_id": e.real_id, "generated_id": e.generated_id, "generator": e.generator,
            "prompt_id": e.prompt_id, "caption": store.records["text"].get(e.prompt_id, {}).get("caption"),
            "frames": int(frames_THWC.shape[0]), "width": int(frames_THWC.shape[2]),
            "height": int(frames_THWC.shape[1])})
        write_json(out_dir / INDEX, index)
    return PreviewResult(out_dir, files, encoder[0], len(entries))


def spread(entries: list[PairEntry], n: int) -> list[PairEntry]:
    """Up to n entries, as many real clips as possible: round k takes the k-th negative of each clip."""
    by_real: dict[str, list[PairEntry]] = {}
    for e in sorted(entries, key=lambda e: (e.real_id, e.generator, e.generated_id)):
        by_real.setdefault(e.real_id, []).append(e)
    rounds = max(len(v) for v in by_real.values())
    ordered = [v[k] for k in range(rounds) for v in by_real.values() if k < len(v)]
    return ordered[:n]


def previous_files(out_dir: Path) -> list[str]:
    """The files the last run listed in out_dir/index.json; ValueError if out_dir holds anything else."""
    if not out_dir.exists():
        return []
    if not out_dir.is_dir():
        raise ValueError(f"preview folder {out_dir} is a file: name a folder")
    listed: list[str] = []
    if (out_dir / INDEX).is_file():
        try:
            index = json.loads((out_dir / INDEX).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{out_dir / INDEX} is not a preview index ({err}): name a new or empty folder") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"{out_dir / INDEX} was not written by the preview tool: name a new or empty folder")
        listed = [p["file"] for p in index.get("previews", [])]
    ours = {INDEX, *listed}
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in ours and not is_partial(p.name))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ValueError(f"preview folder {out_dir} holds files that are not previews ({shown}); previews replace "
                         f"only their own files: name a new or empty folder")
    return [*listed, *(p.name for p in out_dir.iterdir() if is_partial(p.name))]


def is_partial(name: str) -> bool:
    """What `write_video` / `write_json` leave when killed mid-file."""
    return name.endswith(".mp4.partial") or name == INDEX + ".partial"


def load_store_vae(store: GTPairStore, device: str) -> WanVAE:
    path = (store.attrs.get("vae") or {}).get("path")
    if not path or not Path(path).is_dir():
        raise ValueError(f"store {store.path}: its VAE folder {path!r} (attrs vae.path) is gone; give the folder "
                         f"of the same VAE with --vae")
    return WanVAE.load(path, device)


def check_vae_fits(vae: WanVAE, store: GTPairStore) -> None:
    """The store's latents are normalised with its VAE's statistics: another VAE would decode garbage."""
    want = store.attrs.get("vae") or {}
    for field, have in (("latents_mean", vae.mean_C), ("latents_std", vae.std_C)):
        if field in want and not torch.allclose(have, torch.tensor(want[field], dtype=torch.float32), atol=1e-6):
            raise ValueError(f"VAE {vae.path}: {field} differs from the store's vae.{field} ({store.path}); "
                             f"give the VAE the store was made with")


def preview_encoder() -> tuple[str, dict]:
    """H.264 when this PyAV can write it, else mpeg4 (any player reads both)."""
    found = encoder_for("h264")
    if found is None:
        log.warning("this PyAV build has no H.264 encoder: previews are written as mpeg4")
        return MPEG4
    name, options = found
    return name, {**options, **H264_QUALITY.get(name, {})}


def to_uint8(pixels_CTHW: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [3, T, H, W] -> uint8 [T, 3, H, W]."""
    return ((pixels_CTHW.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3)


def side_by_side(left_TCHW: torch.Tensor, right_TCHW: torch.Tensor) -> np.ndarray:
    """uint8 [T, H, 2W + SEPARATOR, 3] (see `panels`)."""
    assert left_TCHW.shape == right_TCHW.shape, (left_TCHW.shape, right_TCHW.shape)
    return panels([left_TCHW, right_TCHW])


def panels(videos_TCHW: list[torch.Tensor]) -> np.ndarray:
    """uint8 [T, H, n W + (n - 1) SEPARATOR, 3]: the videos left to right with white columns between, padded
    with black to even sizes (yuv420p needs them)."""
    t, _, h, _ = videos_TCHW[0].shape
    gap = torch.full((t, 3, h, SEPARATOR), 255, dtype=torch.uint8)
    frames_TCHW = torch.cat([p for v in videos_TCHW for p in (gap, v)][1:], dim=3)
    frames_TCHW = torch.nn.functional.pad(frames_TCHW, (0, frames_TCHW.shape[3] % 2, 0, h % 2))
    return frames_TCHW.permute(0, 2, 3, 1).contiguous().numpy()


def write_video(path: Path, frames_THWC: np.ndarray, fps: float, encoder: tuple[str, dict]) -> None:
    """Write to a .partial name and rename, so a file with the final name is always complete."""
    import av

    name, options = encoder
    tmp = path.with_name(path.name + ".partial")
    with av.open(str(tmp), "w", format="mp4") as out:
        stream = out.add_stream(name, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames_THWC.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = dict(options)
        if name == "mpeg4":
            stream.bit_rate = 8_000_000  # its 200 kbit/s default smears small clips
        for frame in frames_THWC:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.replace(tmp, path)


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)

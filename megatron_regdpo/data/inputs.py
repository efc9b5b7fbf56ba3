"""Finding the input videos and their captions.

A folder of videos; each caption either in `<name>.txt` next to `<name>.<ext>`, or in a `captions.jsonl`
at the folder's top with lines {"file": "<path relative to the folder>", "caption": "..."}. Both may be
used in one folder; captions.jsonl wins where both name a file. Videos are found recursively.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .store import safe_id

VIDEO_EXTS = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".ogv"})
CAPTIONS_FILE = "captions.jsonl"


@dataclass(frozen=True)
class InputVideo:
    path: Path
    sample_id: str
    caption: str | None  # None: no caption found (the video is skipped as no_caption)


def read_captions_jsonl(path: Path) -> dict[str, str]:
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            out[str(Path(entry["file"]))] = entry["caption"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: want a JSON object with 'file' and 'caption' "
                             f"({type(e).__name__}: {e})") from None
    return out


def find_inputs(folder: str | Path) -> list[InputVideo]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"input folder {folder} does not exist")
    jsonl = folder / CAPTIONS_FILE
    captions = read_captions_jsonl(jsonl) if jsonl.is_file() else {}
    files = {p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS}
    files |= {folder / f for f in captions if (folder / f).is_file()}  # named explicitly, any extension
    videos = sorted(files)
    ids = [safe_id(str(p.relative_to(folder).with_suffix(""))) for p in videos]
    clashes = {i for i in ids if ids.count(i) > 1}  # a.mp4 and a.webm: keep the extension in the id
    out = []
    for path, sid in zip(videos, ids):
        rel = path.relative_to(folder)
        if sid in clashes:
            sid = safe_id(str(rel).replace(".", "_"))
        caption = captions.get(str(rel))
        if caption is None and path.with_suffix(".txt").is_file():
            caption = path.with_suffix(".txt").read_text(errors="replace")
        caption = caption.strip() if isinstance(caption, str) else None
        out.append(InputVideo(path, sid, caption or None))
    return out

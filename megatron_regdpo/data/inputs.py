"""Finding the input videos and their captions.

A folder of videos; each caption either in `<name>.txt` next to `<name>.<ext>`, or in a `captions.jsonl`
at the folder's top with lines {"file": "<path relative to the folder>", "caption": "..."}. Both may be
used in one folder; captions.jsonl wins where both name a file. Videos are found recursively.

Captions are UTF-8 (a leading byte-order mark is allowed). A caption that does not decode is reported, never
stored garbled: `scan_inputs` returns the folder's problems (bad captions.jsonl lines, lines naming missing
videos) beside the videos, and a video whose own .txt is bad carries its problem.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput
from .store import safe_id

VIDEO_EXTS = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".ogv"})
CAPTIONS_FILE = "captions.jsonl"


@dataclass(frozen=True)
class InputVideo:
    path: Path
    sample_id: str
    caption: str | None  # None: no caption found (the video is skipped as no_caption)
    problem: BadInput | None = None  # set: the video is skipped for this reason (e.g. its .txt is not UTF-8)


def read_captions_jsonl(path: Path, folder: Path | None = None) -> tuple[dict[str, str], list[BadInput]]:
    """{file relative to `folder`: caption} from the lines that are valid, and one BadInput per line that is
    not (bad_caption) or names a video missing from `folder` (missing_video; not checked without a folder)."""
    captions, problems = {}, []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        where = f"{path}:{n}"
        try:
            line = _utf8(raw[3:] if n == 1 and raw.startswith(b"\xef\xbb\xbf") else raw)
            if not line.strip():
                continue
            rel, caption = _entry(line)
        except ValueError as e:
            problems.append(BadInput(where, "bad_caption", str(e)))
            continue
        if folder is not None and not (folder / rel).is_file():
            problems.append(BadInput(folder / rel, "missing_video", f"{where} names it but there is no such file"))
            continue
        captions[rel] = caption
    return captions, problems


def _entry(line: str) -> tuple[str, str]:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
            or not isinstance(entry.get("caption"), str):
        raise ValueError(f"want a JSON object with string 'file' and 'caption', got {line.strip()[:120]!r}")
    rel = Path(entry["file"])
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"'file' must be a path inside the input folder, got {entry['file']!r}")
    return str(rel), entry["caption"]


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 at byte offset {e.start} of the line "
                         f"({raw[e.start:e.start + 4]!r}: {e.reason})") from None


def _read_txt(txt: Path) -> str:
    data = txt.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"caption {txt} is not valid UTF-8 at byte offset {e.start} "
                         f"({data[e.start:e.start + 4]!r}: {e.reason})") from None


def scan_inputs(folder: str | Path) -> tuple[list[InputVideo], list[BadInput]]:
    """The videos under `folder` with their captions, and the problems of captions.jsonl (bad_caption for a
    line that is not an entry, missing_video for a line naming no file): each reported, none fatal."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"input folder {folder} does not exist")
    jsonl = folder / CAPTIONS_FILE
    captions, problems = read_captions_jsonl(jsonl, folder) if jsonl.is_file() else ({}, [])
    files = {p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS}
    files |= {folder / f for f in captions}  # named explicitly, any extension
    videos = sorted(files)
    ids = [safe_id(str(p.relative_to(folder).with_suffix(""))) for p in videos]
    clashes = {i for i in ids if ids.count(i) > 1}  # a.mp4 and a.webm: keep the extension in the id
    out = []
    for path, sid in zip(videos, ids):
        rel = path.relative_to(folder)
        if sid in clashes:
            sid = safe_id(str(rel).replace(".", "_"))
        caption, problem = captions.get(str(rel)), None
        txt = path.with_suffix(".txt")
        if caption is None and txt.is_file():
            try:
                caption = _read_txt(txt)
            except ValueError as e:
                problem = BadInput(path, "bad_caption", str(e))
        caption = caption.strip() if caption is not None else None
        out.append(InputVideo(path, sid, caption or None, problem))
    return out, problems


def find_inputs(folder: str | Path) -> list[InputVideo]:
    """scan_inputs' videos, strictly: a problem in captions.jsonl is a ValueError naming every one."""
    videos, problems = scan_inputs(folder)
    if problems:
        raise ValueError(f"{len(problems)} problem(s) with the captions of {folder}:\n" +
                         "\n".join(f"  {p}" for p in problems))
    return videos

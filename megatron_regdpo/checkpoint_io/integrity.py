"""Checkpoint integrity: a checksum manifest written at save and verified before anything is unpickled.

`checksums.json` lists every file of a checkpoint folder (name, size, sha256). It is JSON, so reading it
runs nothing; checking it before dist_checkpointing opens a file turns a truncated `.distcp`, a missing
`.metadata` or flipped payload bytes into one CheckpointError that names the folder and the file, instead
of a multi-rank traceback or (flipped bytes) a silent load. A crafted checkpoint can bring its own manifest,
so this is no defence against malice: safe_load.py is. sha256 costs about 1 s per GB on one core
(docs/benchmarks.md); the ranks split the files between them.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch.distributed as dist

MANIFEST = "checksums.json"
ALGORITHM = "sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: damaged, incomplete or refused. Names folder and file."""

    def __init__(self, folder: str | Path, file: str | None, problem: str):
        self.folder, self.file, self.problem = Path(folder), file, problem
        where = f"{self.folder / file}" if file else f"{self.folder}"
        super().__init__(f"checkpoint {where}: {problem}")


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | Path) -> None:
    """On one rank, after every file of the checkpoint exists (and before it is published by rename)."""
    folder = Path(folder)
    files = {p.name: {"size": p.stat().st_size, ALGORITHM: _digest(p)} for p in _files(folder)}
    tmp = folder / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"algorithm": ALGORITHM, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("algorithm") != ALGORITHM or not all(isinstance(v, dict) for v in files.values()):
            raise ValueError(f"not a {ALGORITHM} manifest")
        return files
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(folder, MANIFEST, f"unreadable checksum manifest ({e})") from None


def _problems(folder: Path, files: dict, mine: list[str]) -> list[tuple[str, str]]:
    """(file, problem) for this rank's share: sizes of every file (cheap), hashes of `mine`."""
    found = []
    for name, want in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            found.append((name, "is missing"))
        elif path.stat().st_size != want.get("size"):
            found.append((name, f"has {path.stat().st_size} bytes, {want.get('size')} were written (truncated?)"))
        elif name in mine and _digest(path) != want.get(ALGORITHM):
            found.append((name, f"does not match its {ALGORITHM} (the bytes changed after the save)"))
    extra = sorted(p.name for p in _files(folder) if p.name not in files)
    found += [(name, f"is not in {MANIFEST}: the checkpoint was changed after its save") for name in extra]
    return found


def verify(folder: str | Path) -> None:
    """Check `folder` against its manifest; collective when torch.distributed is initialized (each rank
    hashes a share of the files, all ranks raise the same CheckpointError). A folder without a manifest
    (written before manifests existed) passes with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, None, "does not exist")
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    files = None
    try:
        files = _read_manifest(folder)
        if files is None:
            problems = []
        else:
            mine = [n for i, n in enumerate(sorted(files)) if i % world == rank]
            problems = _problems(folder, files, mine)
    except CheckpointError as e:
        problems = [(e.file, e.problem)]
    except OSError as e:  # unreadable file: reported, not raised alone (the other ranks wait in the gather)
        problems = [(Path(e.filename or MANIFEST).name, f"could not be read ({e.strerror or e})")]
    if distributed:  # every rank learns every rank's findings: one error, the same on all ranks
        gathered = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = sorted({p for part in gathered for p in part})
    if problems:
        name, problem = problems[0]
        more = f" (and {len(problems) - 1} more problem(s): {', '.join(n for n, _ in problems[1:4])})" \
            if len(problems) > 1 else ""
        raise CheckpointError(folder, name, problem + more)
    if files is None and rank == 0:
        warnings.warn(f"checkpoint {folder} has no {MANIFEST} (written before checksums): loading it unverified",
                      stacklevel=2)

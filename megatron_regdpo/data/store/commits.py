"""The commit log: an append-only JSONL file inside the store, its done-list and source of truth.

A sample is written array by array and only then committed by appending one line. A run killed at any
point leaves at most one uncommitted (partial) sample, which readers ignore and the next run overwrites.
One `write()` of one short line on an O_APPEND descriptor is not torn by killing the process; a line torn
by a crash of the machine is dropped (and cut off) on the next open for writing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class CommitLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        """Committed records in order; a trailing line without its newline was never committed."""
        if not self.path.is_file():
            return []
        text = self.path.read_text()
        lines = text.split("\n")[:-1]  # the part after the last newline is incomplete (or empty)
        records = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}:{n}: not a JSON record ({e})") from None
        return records

    def repair(self) -> None:
        """Cut a torn last line (bytes after the last newline) so that appends start on a fresh line."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with self.path.open("r+b") as f:
                f.truncate(keep)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

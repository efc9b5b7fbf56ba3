"""repair_store: make a store whose commit log names a sample more than once consistent again, losing none.

How such a store arises: two writers at once (before the writer lock existed, or a store copied while it was
written): both wrote the same sample's arrays and both committed it. Each copy of the record describes the
same sample; the arrays on disk are the last writer's, or a mix of two writers if they overlapped.

The repair, under the store's writer lock:
1. keep one record per (kind, id): the last one (the one whose writer overwrote the arrays last), at the
   position of the first (texts stay before the clips that use them);
2. read every sample that was committed more than once back from disk (all chunks present, decompressible,
   the shapes its record gives); one that fails is uncommitted, with what depends on it (the clips of a
   text, the negatives of a clip), so that the next preprocess / generate run makes them again;
3. write the new log beside the old one and rename it over (the old log is kept as commits.jsonl.bak-<time>);
4. rewrite the pair index and delete uncommitted groups (`finalize`).
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .store import COMMITS, GTPairStore

_ARRAYS = {"text": (("text", "emb"), ("text", "mask")), "real": (("real", "latents"),),
           "generated": (("generated", "latents"),)}


@dataclass
class RepairResult:
    duplicates: int = 0                  # log lines dropped because their sample was already committed
    uncommitted: list[str] = field(default_factory=list)  # kind/id whose arrays could not be read back
    backup: str | None = None
    pairs: int = 0

    def format(self) -> str:
        if not self.duplicates and not self.uncommitted:
            return "nothing to repair: no sample is committed twice"
        lines = [f"repaired: dropped {self.duplicates} duplicate commit records (old log kept as {self.backup})"]
        if self.uncommitted:
            lines.append(f"uncommitted {len(self.uncommitted)} samples whose arrays were damaged (the next run of "
                         f"the tool that made them makes them again): {', '.join(self.uncommitted[:10])}"
                         + (" ..." if len(self.uncommitted) > 10 else ""))
        lines.append(f"pair index: {self.pairs} pairs")
        return "\n".join(lines)


def repair_store(path: str | Path) -> RepairResult:
    store = GTPairStore(path, mode="a")  # takes the writer lock: no run may write while we repair
    records = store.log.read()
    seen = Counter((r["kind"], r["id"]) for r in records)
    result = RepairResult(duplicates=len(records) - len(seen))
    if not result.duplicates:
        result.pairs = store.finalize()
        return result
    last = {(r["kind"], r["id"]): r for r in records}
    order, placed = [], set()
    for r in records:
        key = (r["kind"], r["id"])
        if key not in placed:
            placed.add(key)
            order.append(last[key])
    damaged = {key for key, n in seen.items() if n > 1 and not _readable(store, *key, last[key])}
    for kind, link, parent in (("real", "prompt_id", "text"), ("generated", "real_id", "real")):  # dependents
        damaged |= {(kind, r["id"]) for r in order if r["kind"] == kind and (parent, r.get(link)) in damaged}
    keep = [r for r in order if (r["kind"], r["id"]) not in damaged]
    result.uncommitted = sorted(f"{k}/{i}" for k, i in damaged)
    result.backup = _replace_log(store.path / COMMITS, keep)
    repaired = GTPairStore(path, mode="a")  # the same process: shares the lock; reads the new log
    result.pairs = repaired.finalize()
    return result


def _readable(store: GTPairStore, kind: str, key: str, rec: dict) -> bool:
    groups = list(_ARRAYS[kind])
    if kind == "real" and store.attrs.get("task") == "i2v":
        groups += [("image", "clip"), ("image", "cond")]
    try:
        for group, name in groups:
            arr = store.root[group][key][name]
            if arr.nchunks_initialized != arr.nchunks:
                return False
            arr[...]
            if name == "latents" and list(arr.shape) != rec.get("latent_shape"):
                return False
    except Exception:  # noqa: BLE001 - any failure to read back means the arrays are not trustworthy
        return False
    return True


def _replace_log(log: Path, records: list[dict]) -> str:
    backup = log.with_name(f"{log.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
    tmp = log.with_name(f"{log.name}.tmp")
    with tmp.open("w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.link(log, backup)  # the old log stays, under another name, until the new one is in place
    os.replace(tmp, log)
    return str(backup)

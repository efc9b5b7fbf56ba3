"""GTPairStore: the zarr 3 store of one GT-Pair data set.

Layout (every array one chunk, blosc-zstd; bf16 as a uint16 view, see arrays.py):
  /                      attrs: format, version, task, fps, frames, short_side, bucket, latent_dtype, text_len,
                         vae / text_encoder / image_encoder descriptions (incl. latents_mean/std), negative prompt
  real/<id>/latents      [C, F, h, w] normalised VAE latents of a real clip (the winner)
  image/<id>/clip        [I, E] CLIP penultimate hidden states of its first frame        (I2V only)
  image/<id>/cond        [4 + C, F, h, w] first-frame mask + first-frame-only latents   (I2V only)
  text/<prompt_id>/emb   [T, E] text embeddings, zero beyond the tokens; text/<prompt_id>/mask [T] bool
  generated/<id>/latents [C, F, h, w] a negative (the loser) for one real clip
  pairs/{real_id,generated_id,generator,prompt_id}  the pair index, one row per (winner, loser)
  commits.jsonl          the done-list: one JSON record per committed sample (kind, id, metadata)

Writes are resumable: a sample's arrays are written first (overwriting any partial leftovers) and the
sample is committed last; `finalize` rebuilds the pair index from the log and deletes uncommitted groups.
One process writes the commit log, the one holding the writer lock. In a multi-rank job the other ranks open
the store `shared=True`: they write the arrays of their own samples and queue the commits, which rank 0
appends to the log for them (data/ranks.py); `commit_records` never commits an id twice.

Legend: C latent channels (+4 mask channels in cond), F/h/w latent frames/height/width, T text tokens,
E embedding width, I image tokens.
"""
from __future__ import annotations

import hashlib
import re
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_regdpo.parallel.lock import FolderLock

from .arrays import STORED_DTYPES, read_array, read_strings, write_array, write_strings
from .commits import CommitLog

FORMAT = "megatron_regdpo.gt_pair_store"
VERSION = 1
COMMITS = "commits.jsonl"
WRITER_LOCK = "writer.lock"  # megatron_regdpo.parallel.lock: host, pid and start time of the writing process
KINDS = ("text", "real", "generated")
SAMPLE_GROUPS = ("real", "image", "text", "generated")  # groups whose members must be committed
# Attributes that must match when a run resumes into an existing store (else the data would mix).
IDENTITY_KEYS = ("task", "fps", "frames", "short_side", "bucket", "latent_dtype", "text_len")
PAIR_FIELDS = ("real_id", "generated_id", "generator", "prompt_id")


def safe_id(name: str) -> str:
    """A zarr-safe key: path separators become '__', anything outside [A-Za-z0-9._-] becomes '_'."""
    key = re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("/", "__").replace("\\", "__")).strip(".")
    if not key:
        raise ValueError(f"cannot make a sample id from {name!r}")
    return key


def prompt_id(caption: str) -> str:
    return "p" + hashlib.sha256(caption.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PairEntry:
    real_id: str
    generated_id: str
    generator: str
    prompt_id: str


class GTPairStore:
    def __init__(self, path: str | Path, mode: str = "r", shared: bool = False):
        """mode "r" reads; "a" takes the writer lock and appends; "a" with shared=True is a rank of a job
        whose rank 0 holds the lock: arrays are written here, commits queued in `self.queue`."""
        import zarr

        if mode not in ("r", "a"):
            raise ValueError(f"store mode {mode!r} must be 'r' or 'a'")
        self.path, self.mode = Path(path), mode
        if not (self.path / "zarr.json").is_file():
            raise ValueError(f"{self.path} is not a GT-Pair store (no zarr.json)")
        self.root = zarr.open_group(str(self.path), mode="r" if mode == "r" else "r+")
        if self.root.attrs.get("format") != FORMAT:
            raise ValueError(f"{self.path}: attribute format={self.root.attrs.get('format')!r}, want {FORMAT!r}")
        self.log = CommitLog(self.path / COMMITS)
        self.queue: list[dict] | None = [] if shared else None  # commits waiting for rank 0 (shared writers)
        if mode == "a" and not shared:  # one writer at a time (readers need no lock); held until this object is collected
            lock = FolderLock(self.path / WRITER_LOCK, f"store {self.path}").acquire()
            weakref.finalize(self, lock.release)
            self.log.repair()
            for name in (*SAMPLE_GROUPS, "pairs"):
                self.root.require_group(name)
        self.records: dict[str, dict[str, dict]] = {k: {} for k in KINDS}
        self.duplicates: list[tuple[str, str]] = []
        for rec in self.log.read():
            kind, key = rec.get("kind"), rec.get("id")
            if kind not in self.records or not key:
                raise ValueError(f"{self.log.path}: bad record {rec}")
            if key in self.records[kind]:
                self.duplicates.append((kind, key))
            self.records[kind][key] = rec

    @classmethod
    def open_or_create(cls, path: str | Path, attrs: dict) -> "GTPairStore":
        """Open `path` for appending, creating it with `attrs`; ValueError if it was made with other settings."""
        import zarr

        path = Path(path)
        if not (path / "zarr.json").is_file():
            if path.exists() and any(path.iterdir()):
                raise ValueError(f"{path} exists, is not empty and is not a GT-Pair store: name a new folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            zarr.create_group(str(path), attributes={"format": FORMAT, "version": VERSION, **attrs})
        store = cls(path, mode="a")
        old = store.attrs
        for key in IDENTITY_KEYS:
            if key in attrs and old.get(key) != attrs[key]:
                raise ValueError(f"{path}: the store was made with {key}={old.get(key)!r}, this run has "
                                 f"{key}={attrs[key]!r}; use a new store or the same settings")
        for enc, field in (("vae", "latents_mean"), ("vae", "latents_std"), ("text_encoder", "dim")):
            new_v, old_v = (attrs.get(enc) or {}).get(field), (old.get(enc) or {}).get(field)
            if new_v is not None and old_v is not None and new_v != old_v:
                raise ValueError(f"{path}: the store was made with {enc}.{field}={old_v}, this run's model has "
                                 f"{new_v}; use a new store or the same model")
        return store

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    def update_attrs(self, **values) -> None:
        self.root.attrs.update(values)

    def latent_dtype(self) -> torch.dtype:
        return STORED_DTYPES[self.attrs.get("latent_dtype", "bf16")]

    def committed(self, kind: str, key: str) -> bool:
        return key in self.records[kind]

    # ---------------------------------------------------------------- writing (arrays first, commit last)

    def write_text(self, pid: str, emb_TE: torch.Tensor, mask_T: torch.Tensor, caption: str) -> None:
        self._write("text", pid, [("text", "emb", emb_TE, self.latent_dtype()), ("text", "mask", mask_T, None)],
                    {"caption": caption, "tokens": int(mask_T.sum())})

    def write_real(self, sid: str, latents_CFhw: torch.Tensor, record: dict, image_IE: torch.Tensor | None = None,
                   cond_CFhw: torch.Tensor | None = None) -> None:
        if record.get("prompt_id") not in self.records["text"]:
            raise ValueError(f"real sample {sid}: its text {record.get('prompt_id')} is not committed yet")
        arrays = [("real", "latents", latents_CFhw, self.latent_dtype())]
        if image_IE is not None:
            arrays += [("image", "clip", image_IE, self.latent_dtype()),
                       ("image", "cond", cond_CFhw, self.latent_dtype())]
        self._write("real", sid, arrays, {**record, "latent_shape": list(latents_CFhw.shape)})

    def write_generated(self, gid: str, latents_CFhw: torch.Tensor, record: dict) -> None:
        real = self.records["real"].get(record.get("real_id"))
        if real is None:
            raise ValueError(f"generated sample {gid}: real clip {record.get('real_id')!r} is not in the store")
        if list(latents_CFhw.shape) != real["latent_shape"]:
            raise ValueError(f"generated sample {gid}: latent shape {list(latents_CFhw.shape)} differs from its real "
                             f"clip's {real['latent_shape']}")
        self._write("generated", gid, [("generated", "latents", latents_CFhw, self.latent_dtype())],
                    {**record, "prompt_id": real["prompt_id"], "latent_shape": list(latents_CFhw.shape)})

    def _write(self, kind: str, key: str, arrays, record: dict) -> None:
        assert self.mode == "a", "store opened read-only"
        assert key not in self.records[kind], f"{kind}/{key} is already committed"
        groups = {}
        for group_name, array_name, tensor, dtype in arrays:
            if group_name not in groups:  # overwrite=True drops the leftovers of an interrupted run
                groups[group_name] = self.root[group_name].create_group(key, overwrite=True)
            write_array(groups[group_name], array_name, tensor, dtype)
        rec = {"kind": kind, "id": key, **record}
        if self.queue is not None:
            self.queue.append(rec)
        else:
            self.log.append(rec)
            self.records[kind][key] = rec

    def commit_records(self, records: list[dict], write: bool = True) -> int:
        """Commit samples whose arrays another rank wrote (appending to the log when `write`, i.e. on the lock
        holder), skipping any id already committed; returns how many were skipped."""
        skipped = 0
        for rec in records:
            if rec["id"] in self.records[rec["kind"]]:
                skipped += 1
                continue
            if write:
                self.log.append(rec)
            self.records[rec["kind"]][rec["id"]] = rec
        return skipped

    # ---------------------------------------------------------------- index and clean-up

    def pair_entries(self) -> list[PairEntry]:
        """The pairs as the commit log defines them, in index order."""
        gens = self.records["generated"].values()
        rows = [PairEntry(g["real_id"], g["id"], g["generator"], g["prompt_id"]) for g in gens]
        return sorted(rows, key=lambda p: (p.real_id, p.generator, p.generated_id))

    def finalize(self) -> int:
        """Write the pair index from the commit log and delete uncommitted groups; returns the pair count."""
        rows = self.pair_entries()
        group = self.root.require_group("pairs")
        for field in PAIR_FIELDS:
            write_strings(group, field, [getattr(r, field) for r in rows])
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.generator] = counts.get(r.generator, 0) + 1
        group.attrs.update({"count": len(rows), "generators": counts})
        for name, key in self.orphans():
            del self.root[name][key]
        return len(rows)

    def orphans(self) -> list[tuple[str, str]]:
        """(group, id) of sample groups without a commit: leftovers of an interrupted run."""
        owner = {"real": "real", "image": "real", "text": "text", "generated": "generated"}
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr warns about non-zarr files (the commit log) when listing
            for name in SAMPLE_GROUPS:
                if name in self.root:
                    out += [(name, k) for k in sorted(self.root[name].group_keys())
                            if k not in self.records[owner[name]]]
        return out

    def pair_index(self) -> list[PairEntry]:
        """The pair index as written by the last `finalize` (what training reads)."""
        if "pairs" not in self.root or "real_id" not in self.root["pairs"]:
            return []
        cols = [read_strings(self.root["pairs"], f) for f in PAIR_FIELDS]
        return [PairEntry(*row) for row in zip(*cols)]

    # ---------------------------------------------------------------- reading

    def read_latents(self, kind: str, key: str) -> torch.Tensor:
        return read_array(self.root[kind][key], "latents")

    def read_text(self, pid: str) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.root["text"][pid]
        return read_array(group, "emb"), read_array(group, "mask")

    def read_image(self, sid: str) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.root["image"][sid]
        return read_array(group, "clip"), read_array(group, "cond")

"""The `cached` reference: errors precomputed offline, stored in a zarr group, looked up by key.

Valid because noise and timestep are keyed (objectives.flow_matching): the pair `pair_id` drawn with
(seed, step, draw) gets the same eps and t offline and in training, so its reference errors are the same
numbers. The cache records seed and step once (the trainer draws a cached run's noise with that step and
varies `draw`, e.g. per epoch) and one row per (pair_id, draw).

Layout (its own group, e.g. STORE/reference_cache; nothing else of the store is read or written):
  attrs: format, version, seed, step, flow_matching {shift, timestep_sampling, logit_mean, logit_std},
         model {checkpoint, checkpoint_id (checkpoint_fingerprint), arch, dtype}, err_dtype
  pair_id [N] int64, draw [N] int64, err_ref [N, 2] float64 (winner, loser)

Every mismatch is an error naming the key: another seed or step, a (pair_id, draw) not cached, or recorded
attributes that differ from the run's `expect` (nested dicts compare only the keys given, e.g.
{"flow_matching": settings, "model": {"checkpoint": str(Path(base_ckpt).resolve())}}).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

FORMAT = "megatron_regdpo.reference_cache"
MANIFEST = "checksums.json"  # checkpoint_io.integrity.MANIFEST (that module imports torch.distributed)
VERSION = 1


def _plain(value):
    """JSON-normalised value (dataclasses -> dicts, tuples -> lists) for comparing attributes."""
    def encode(obj):
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        raise TypeError(f"{type(obj).__name__} is not a JSON value")

    return json.loads(json.dumps(value, default=encode))


def checkpoint_fingerprint(ckpt_dir: str | Path, sample: int = 1 << 16) -> str:
    """A content-derived id of a checkpoint folder: its checksum manifest when it has one, else every file's
    name and size plus its first, middle and last `sample` bytes (hashing all of a 14B checkpoint would take
    minutes; the samples still differ between two trainings' weights). A copy or a move keeps the id."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint {root} not found")
    manifest = root / MANIFEST
    if manifest.is_file():  # every file's full sha256, written at save (checkpoint_io/integrity.py): use that
        canonical = json.dumps(json.loads(manifest.read_text()), sort_keys=True)
        return "manifest-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as f:
            for at in sorted({0, max(0, size // 2 - sample // 2), max(0, size - sample)}):
                f.seek(at)
                h.update(f.read(sample))
    return h.hexdigest()[:32]


def read_cache_attrs(path: str | Path) -> dict:
    """The cache's attributes, without reading its rows (for checks before any model is built)."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference cache {path} not found (write it with tools/precompute_reference.py)")
    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    if attrs.get("format") != FORMAT or attrs.get("version") != VERSION:
        raise ValueError(f"{path} is not a reference cache of version {VERSION} "
                         f"(format {attrs.get('format')!r}, version {attrs.get('version')!r})")
    return attrs


def attr_mismatches(recorded: Mapping, want: Mapping, where: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, recorded, wanted) for every key of `want` recorded otherwise (or not at all: recorded is
    the string '<absent>'); nested dicts compare only the keys given."""
    out = []
    for key, value in _plain(dict(want)).items():
        name = f"{where}{key}"
        if key not in recorded:
            out.append((name, "<absent>", value))
        elif isinstance(value, dict) and isinstance(recorded[key], dict):
            out += attr_mismatches(recorded[key], value, f"{name}.")
        elif recorded[key] != value:
            out.append((name, recorded[key], value))
    return out


def write_reference_cache(path: str | Path, pair_ids: Sequence[int], draws: Sequence[int], err_w: Sequence[float],
                          err_l: Sequence[float], *, seed: int, step: int, flow_matching, model: Mapping,
                          err_dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write the group aside (`<path>.partial`) and publish it by rename."""
    import zarr

    path = Path(path)
    keys = list(zip(map(int, pair_ids), map(int, draws)))
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate (pair_id, draw) rows in the reference cache")
    if path.exists() and not overwrite:
        raise FileExistsError(f"reference cache {path} exists; pass overwrite=True (--overwrite) to replace it")
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    group = zarr.open_group(str(partial), mode="w")
    n = len(keys)
    for name, data in (("pair_id", np.asarray([k[0] for k in keys], dtype=np.int64)),
                       ("draw", np.asarray([k[1] for k in keys], dtype=np.int64)),
                       ("err_ref", np.stack([np.asarray(err_w, np.float64), np.asarray(err_l, np.float64)], 1)
                        .reshape(n, 2))):
        group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape or (1,))[...] = data
    group.attrs.update({"format": FORMAT, "version": VERSION, "seed": int(seed), "step": int(step),
                        "flow_matching": _plain(flow_matching), "model": _plain(dict(model)),
                        "err_dtype": str(err_dtype).removeprefix("torch.")})
    if path.exists():
        shutil.rmtree(path)
    partial.rename(path)
    return path


class ReferenceCache:
    """A read-only reference cache, held in memory (two floats per (pair, draw): 16 bytes each)."""

    def __init__(self, path: str | Path, expect: Mapping | None = None):
        import zarr

        self.path = Path(path)
        self.attrs = read_cache_attrs(self.path)
        for name, recorded, value in attr_mismatches(self.attrs, expect or {})[:1]:
            if recorded == "<absent>":
                raise ValueError(f"reference cache {self.path} records no {name!r}; this run expects {value!r}")
            raise ValueError(f"reference cache {self.path} was computed with {name}={recorded!r}; "
                             f"this run has {name}={value!r}")
        group = zarr.open_group(str(self.path), mode="r")
        ids, draws, errs = (group[name][...] for name in ("pair_id", "draw", "err_ref"))
        self.dtype = getattr(torch, self.attrs["err_dtype"])
        self._rows = {(int(p), int(d)): i for i, (p, d) in enumerate(zip(ids, draws))}
        self._draws: dict[int, list[int]] = {}
        for p, d in self._rows:
            self._draws.setdefault(p, []).append(d)
        self._err = torch.from_numpy(np.asarray(errs, dtype=np.float64))

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, pair_ids: Sequence[int], *, seed, step, draw: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(err_ref_w [P], err_ref_l [P]) in the dtype the errors were computed in."""
        if seed != self.attrs["seed"]:
            raise ValueError(f"reference cache {self.path} holds seed {self.attrs['seed']}; "
                             f"the batch asks for seed {seed}")
        if step != self.attrs["step"]:
            raise ValueError(f"reference cache {self.path} holds noise keyed with step {self.attrs['step']}; "
                             f"the batch asks for step {step}")
        rows = []
        for pid in pair_ids:
            key = (int(pid), int(draw))
            if key not in self._rows:
                have = self._draws.get(key[0])
                why = f"pair id {key[0]} is not cached" if have is None else \
                    f"pair id {key[0]} is cached for draw(s) {sorted(have)}, not draw {key[1]}"
                raise KeyError(f"reference cache {self.path}: no entry for (pair_id={key[0]}, draw={key[1]}, "
                               f"seed={seed}, step={step}): {why}")
            rows.append(self._rows[key])
        if not rows:
            raise ValueError("the batch carries no pair ids (ReferenceBatch.pair_ids) to look up")
        err = self._err[rows].to(self.dtype)
        return err[:, 0].contiguous(), err[:, 1].contiguous()

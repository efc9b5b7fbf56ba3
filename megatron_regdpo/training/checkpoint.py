"""Training checkpoints with megatron-core dist_checkpointing: model (and LoRA), optimizer, trainer
state (step, sampler, counters), every rank's RNG.

Layout: <root>/iter_0000123/ (one per save), <root>/latest (the name of the newest complete one).
A save is written aside into iter_XXXXXXX.partial and published by a rename, then `latest` is
replaced atomically; a process killed at any point leaves the previous checkpoint loadable. Only the
newest `keep` checkpoints are kept. Parameters and optimizer state reshard on load.
Each checkpoint carries checksums.json; a damaged or missing newest checkpoint is a CheckpointError that
names the file and gives the command to resume from the previous kept one (never a silent fallback).

Any layout resumes any other valid one: model and optimizer reshard (dist_checkpointing), the sampler's
position is a global step (data/sampler.py), and the RNG follows rng_state.py's rule: the same layout gets
each rank's own states back (bitwise resume), another layout re-seeds every rank from (run seed, step, its
position in the layout). Checkpoints written before that rule hold the CPU generator as a ShardedObject
"rng_state" of global shape (world size,): they restore it at their own world size and re-seed at another.

A model chunk may bring its own checkpoint form (parallel/fsdp2.py): `checkpoint_sharded_state_dict()` is
saved instead of the unwrapped module's `sharded_state_dict()`, and `load_checkpoint_state(state_dict)`
replaces the strict `load_state_dict`.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint import FileSystemReader

from megatron_regdpo.checkpoint_io.integrity import CheckpointError, write_manifest
from megatron_regdpo.checkpoint_io.megatron_ckpt import (META_FILE, barrier, is_rank0, load_sharded, save_sharded,
                                                         with_own_extra_state)
from megatron_regdpo.checkpoint_io.safe_load import safe_unpickling
from megatron_regdpo.parallel.data_parallel import unwrap

from . import rng_state
from .optimizer import load_optimizer_checkpoint_state, optimizer_checkpoint_state, optimizer_layout

LATEST = "latest"
OPTIMIZER_FILE = "optimizer.json"  # which optimizer state layout the checkpoint holds
LEGACY_RNG = "rng_state"  # the ShardedObject key of checkpoints written before rng_state.py


def _model_state(chunk) -> dict:
    own = getattr(chunk, "checkpoint_sharded_state_dict", None)
    return own() if own is not None else unwrap(chunk).sharded_state_dict()


def _load_model_state(chunk, loaded: dict) -> None:
    own = getattr(chunk, "load_checkpoint_state", None)
    if own is not None:
        own(loaded)
    else:
        unwrap(chunk).load_state_dict(with_own_extra_state(unwrap(chunk), loaded), strict=True)


def _sharded_state(model_chunks: list, optimizer, trainer_state: dict | None, rng: dict | None) -> dict:
    """What a save writes (`rng`: rng_state.gather's, common state) or, with `rng` None, what a load asks for."""
    model_sd = {}
    for chunk in model_chunks:
        model_sd.update(_model_state(chunk))
    state = {"model": model_sd, "optimizer": optimizer_checkpoint_state(optimizer, model_sd, rng is None),
             "trainer": dict(trainer_state or {})}
    if rng is not None:
        state["rng"] = rng
    return state


def _legacy_rng(path: Path) -> torch.Tensor | None:
    """This rank's CPU generator state from a checkpoint written before rng_state.py, when that was saved by
    as many ranks as run now; else None. Reads only `.metadata` and the one object (the caller has just
    loaded, so verified, the folder)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    wanted = ShardedObject(LEGACY_RNG, None, (world,), (rank,), replica_id=0)
    with safe_unpickling():
        if wanted.unique_key not in FileSystemReader(str(path)).read_metadata().state_dict_metadata:
            return None
        return dist_checkpointing.load({"rng": wanted}, str(path))["rng"]


def _same_optimizer_layout(path: Path, optimizer) -> None:
    """The distributed optimizer keeps its state in a layout of its own; every other optimizer (megatron-core's,
    FSDP2's) shares one. A checkpoint resumes with an optimizer of its layout (checkpoints written before
    optimizer.json were per-parameter: the distributed optimizer could not be saved then)."""
    file = path / OPTIMIZER_FILE
    saved = json.loads(file.read_text())["layout"] if file.is_file() else "per_parameter"
    now = optimizer_layout(optimizer)
    if saved != now:
        flag = "true" if saved == "distributed" else "false"
        raise CheckpointError(path, OPTIMIZER_FILE, f"holds the {saved} optimizer's state; this run builds the "
                              f"{now} one: resume with parallel.distributed_optimizer={flag}")


class Checkpointer:
    """`meta` (model family, architecture, dtype) is written as model.json into every checkpoint, so
    tools/convert_checkpoint.py can export a training checkpoint directly. `pg` (the job's process groups)
    names the layout the RNG states are saved under; `seed` (run.seed) keys the re-seeding at another one."""

    def __init__(self, root: str | Path, keep: int = 2, meta: dict | None = None, pg=None, seed: int = 0):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.root, self.keep, self.meta, self.pg, self.seed = Path(root), keep, meta, pg, seed

    def latest(self) -> Path | None:
        marker = self.root / LATEST
        if not marker.is_file():
            return None
        path = self.root / marker.read_text().strip()
        if not path.is_dir():
            # no automatic fallback: resuming from an older step than `latest` says must be a decision
            raise CheckpointError(self.root, LATEST, f"names {path.name}, which does not exist; "
                                  + self._previous_hint(path, move_aside=False))
        return path

    def save(self, step: int, model_chunks: list, optimizer, trainer_state: dict) -> Path:
        final = self.root / f"iter_{step:07d}"
        partial = final.with_name(final.name + ".partial")
        if is_rank0():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        barrier()
        rng = rng_state.gather(rng_state.layout_of(self.pg))  # before any writer: it is a collective
        state = _sharded_state(model_chunks, optimizer, {**trainer_state, "step": step}, rng)
        save_sharded(state, partial)  # its writer processes die with this one
        barrier()
        if is_rank0():
            if self.meta is not None:
                (partial / META_FILE).write_text(json.dumps(self.meta, indent=2, sort_keys=True))
            (partial / OPTIMIZER_FILE).write_text(json.dumps({"layout": optimizer_layout(optimizer)}))
            write_manifest(partial)  # last: it covers every file above, so a load can check them all
            shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step replaces it
            partial.rename(final)
            tmp = self.root / f"{LATEST}.tmp"
            tmp.write_text(final.name)
            os.replace(tmp, self.root / LATEST)
            self._prune()
        barrier()
        return final

    def _kept(self) -> list[Path]:
        return sorted(p for p in self.root.glob("iter_*") if p.is_dir() and not p.name.endswith(".partial"))

    def _previous_hint(self, bad: Path, move_aside: bool) -> str:
        """How to resume from the newest kept checkpoint before `bad` (by hand: it repeats steps)."""
        older = [p for p in self._kept() if p.name < bad.name]
        if not older:
            return "no earlier checkpoint is kept: start the run afresh (or restore the folder)"
        prev, q = older[-1], lambda p: shlex.quote(str(p))
        # aside under a name `iter_*` does not match, so pruning and `latest` never see it again
        aside = f"mv {q(bad)} {q(self.root / ('damaged-' + bad.name))} && " if move_aside else ""
        return (f"the previous kept checkpoint is {prev}; to resume from it run: "
                f"{aside}echo {prev.name} > {q(self.root / LATEST)}")

    def _prune(self) -> None:
        done = self._kept()
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str | Path, model_chunks: list, optimizer) -> dict:
        """Restore model, optimizer and this rank's RNG (rng_state.py's rule) from `path`; return the
        trainer state."""
        path = Path(path)
        _same_optimizer_layout(path, optimizer)  # a choice of this run, not damage: no hint to go back
        try:
            if not (path / "metadata.json").is_file():
                raise CheckpointError(path, "metadata.json", "is missing: not a complete training checkpoint")
            state = load_sharded(_sharded_state(model_chunks, optimizer, None, rng=None), path)
        except CheckpointError as e:
            if path.parent.resolve() != self.root.resolve():
                raise
            raise CheckpointError(e.folder, e.file, f"{e.problem}; "
                                  + self._previous_hint(path, move_aside=True)) from e.__cause__
        for chunk in model_chunks:
            _load_model_state(chunk, state["model"])
        load_optimizer_checkpoint_state(optimizer, state["optimizer"])
        trainer = state["trainer"]
        legacy = _legacy_rng(path) if "rng" not in state else None
        if legacy is not None:
            torch.set_rng_state(legacy)
        else:
            rng_state.restore(state.get("rng"), rng_state.layout_of(self.pg), self.seed, int(trainer["step"]))
        return trainer

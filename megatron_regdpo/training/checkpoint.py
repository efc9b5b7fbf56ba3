"""Training checkpoints with megatron-core dist_checkpointing: model (and LoRA), optimizer, trainer
state (step, sampler, counters), per-rank RNG.

Layout: <root>/iter_0000123/ (one per save), <root>/latest (the name of the newest complete one).
A save is written aside into iter_XXXXXXX.partial and published by a rename, then `latest` is
replaced atomically; a process killed at any point leaves the previous checkpoint loadable. Only the
newest `keep` checkpoints are kept. Parameters and optimizer state reshard on load.
Each checkpoint carries checksums.json; a damaged or missing newest checkpoint is a CheckpointError that
names the file and gives the command to resume from the previous kept one (never a silent fallback).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_regdpo.checkpoint_io.integrity import CheckpointError, write_manifest
from megatron_regdpo.checkpoint_io.megatron_ckpt import (META_FILE, barrier, is_rank0, load_sharded, save_sharded,
                                                         with_own_extra_state)
from megatron_regdpo.parallel.data_parallel import unwrap

from .optimizer import load_optimizer_checkpoint_state, optimizer_checkpoint_state

LATEST = "latest"


def _sharded_state(model_chunks: list, optimizer, trainer_state: dict | None, is_loading: bool) -> dict:
    model_sd = {}
    for chunk in model_chunks:
        model_sd.update(unwrap(chunk).sharded_state_dict())
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rng = ShardedObject("rng_state", torch.get_rng_state() if not is_loading else None, (world,), (rank,),
                        replica_id=0)
    return {"model": model_sd, "optimizer": optimizer_checkpoint_state(optimizer, model_sd, is_loading),
            "trainer": dict(trainer_state or {}), "rng": rng}


class Checkpointer:
    """`meta` (model family, architecture, dtype) is written as model.json into every checkpoint, so
    tools/convert_checkpoint.py can export a training checkpoint directly."""

    def __init__(self, root: str | Path, keep: int = 2, meta: dict | None = None):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.root, self.keep, self.meta = Path(root), keep, meta

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
        state = _sharded_state(model_chunks, optimizer, {**trainer_state, "step": step}, is_loading=False)
        save_sharded(state, partial)  # its writer processes die with this one
        barrier()
        if is_rank0():
            if self.meta is not None:
                (partial / META_FILE).write_text(json.dumps(self.meta, indent=2, sort_keys=True))
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
        """Restore model, optimizer and this rank's RNG from `path`; return the trainer state."""
        path = Path(path)
        try:
            if not (path / "metadata.json").is_file():
                raise CheckpointError(path, "metadata.json", "is missing: not a complete training checkpoint")
            state = load_sharded(_sharded_state(model_chunks, optimizer, None, is_loading=True), path)
        except CheckpointError as e:
            if path.parent.resolve() != self.root.resolve():
                raise
            raise CheckpointError(e.folder, e.file, f"{e.problem}; "
                                  + self._previous_hint(path, move_aside=True)) from e.__cause__
        for chunk in model_chunks:
            unwrap(chunk).load_state_dict(with_own_extra_state(unwrap(chunk), state["model"]), strict=True)
        load_optimizer_checkpoint_state(optimizer, state["optimizer"])
        torch.set_rng_state(state["rng"])
        return state["trainer"]

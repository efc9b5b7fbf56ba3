"""PairSampler: which pairs each data-parallel rank trains on at each step.

- A step's global batch is `micro_batch * dp_size` pairs of ONE latent shape (a batch never mixes shapes);
  data-parallel rank r takes the r-th slice, so ranks are disjoint, and every rank of a model-parallel
  group (same dp_rank) gets the same ids without any communication.
- The global batches depend only on (seed, epoch, global batch size): each epoch shuffles the pairs within
  each shape, cuts them into global batches, and shuffles the batch order (a rank's slice adds its
  dp_rank). A shape's last partial batch is, by `small_buckets`:
  "drop": left out this epoch (the next epoch's shuffle trains those pairs), but a shape with fewer pairs than
  one global batch is then never trained: `small_buckets()` names them so a run can refuse to start;
  "repeat": filled with the first pairs of the same shape's shuffle (torch's DistributedSampler pads the same
  way), so every pair trains every epoch; a shape smaller than a global batch repeats pairs within a batch.
- `state_dict` = (epoch, global steps taken in it, global batch size) + a fingerprint of the pair list (and
  its length and mode, to say what changed): resuming mid-epoch continues exactly, at any data-parallel size
  with the same global batch (no pair repeated or skipped); another global batch (GlobalBatchChanged) or pair
  list is refused. States written before the global batch was recorded load as before.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np


class GlobalBatchChanged(ValueError):
    """A sampler state saved with another global batch size: its position means other batches."""


class PairSampler:
    def __init__(self, shapes: Sequence[Sequence[int]], micro_batch: int, dp_rank: int, dp_size: int,
                 seed: int = 0, shuffle: bool = True, small_buckets: str = "drop"):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch} must be >= 1")
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        if small_buckets not in ("drop", "repeat"):
            raise ValueError(f"small_buckets={small_buckets!r} must be 'drop' or 'repeat'")
        self.seed, self.shuffle, self.pad = seed, shuffle, small_buckets == "repeat"
        self.epoch, self.step = 0, 0
        self._batches: dict[int, list[list[int]]] = {}   # global_batches of the epoch in use and the next
        # "repeat" yields other batches: its state must not resume a "drop" run (the drop key is unchanged,
        # so checkpoints written before this option resume as before)
        key = repr(self.shapes) + (" repeat" if self.pad else "")
        self.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
        if self.steps_per_epoch() == 0:
            sizes = {s: self.shapes.count(s) for s in set(self.shapes)}
            raise ValueError(f"no latent shape has the {micro_batch * dp_size} pairs one global batch needs "
                             f"(micro_batch {micro_batch} x dp_size {dp_size}); pairs per shape: {sizes}")

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.dp_size

    def bucket_sizes(self) -> dict[tuple, int]:
        counts: dict[tuple, int] = {}
        for s in self.shapes:
            counts[s] = counts.get(s, 0) + 1
        return counts

    def small_buckets(self) -> dict[tuple, int]:
        """{shape: pairs} of the shapes with fewer pairs than one global batch: never trained under "drop"."""
        return {s: n for s, n in sorted(self.bucket_sizes().items()) if n < self.global_batch}

    def steps_per_epoch(self) -> int:
        g = self.global_batch
        return sum(-(-n // g) if self.pad else n // g for n in self.bucket_sizes().values())

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every global batch of `epoch`, in order (the same on every rank)."""
        rng = np.random.default_rng([self.seed, epoch])
        by_shape: dict[tuple, list[int]] = {}
        for i, s in enumerate(self.shapes):
            by_shape.setdefault(s, []).append(i)
        batches = []
        for shape in sorted(by_shape):
            ids = np.array(by_shape[shape])
            if self.shuffle:
                ids = rng.permutation(ids)
            if self.pad:  # cycle through the shuffle to a whole number of global batches
                ids = np.resize(ids, -(-len(ids) // self.global_batch) * self.global_batch)
            usable = len(ids) // self.global_batch * self.global_batch
            batches += [ids[j:j + self.global_batch].tolist() for j in range(0, usable, self.global_batch)]
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def _batches_of(self, epoch: int) -> list[list[int]]:
        """global_batches(epoch), kept for the epoch in use and the next (peek asks every step)."""
        if epoch not in self._batches:
            for old in [e for e in self._batches if e < epoch - 1]:
                del self._batches[old]
            self._batches[epoch] = self.global_batches(epoch)
        return self._batches[epoch]

    def peek(self) -> list[int]:
        """This rank's next micro-batch, the one iterating yields next, without moving the position."""
        epoch, step = self.epoch, self.step
        if step >= len(self._batches_of(epoch)):   # this epoch is used up: its iterator moves on to the next
            epoch, step = epoch + 1, 0
        lo = self.dp_rank * self.micro_batch
        return self._batches_of(epoch)[step][lo:lo + self.micro_batch]

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's micro-batches from the current position to the end of the epoch, then the next epoch."""
        batches = self._batches_of(self.epoch)
        lo = self.dp_rank * self.micro_batch
        while self.step < len(batches):
            ids = batches[self.step][lo:lo + self.micro_batch]
            self.step += 1
            yield ids
        self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "fingerprint": self.fingerprint,
                "pairs": len(self.shapes), "small_buckets": "repeat" if self.pad else "drop",
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint or state["seed"] != self.seed:
            raise ValueError(f"sampler state is for another pair list or seed: {self._difference(state)}")
        was = state.get("global_batch")
        if was is not None and was != self.global_batch:
            raise GlobalBatchChanged(
                f"the sampler state is at step {state['step']} of epoch {state['epoch']} in global batches of {was} "
                f"pairs, this run's global batch is {self.global_batch} pairs ({self.micro_batch} per data-parallel "
                f"rank x {self.dp_size}): its epoch is cut into other batches, so the position would repeat or skip "
                f"pairs; resume with the global batch of {was} pairs (any data-parallel size that divides it)")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _difference(self, state: dict) -> str:
        """What changed, in the caller's terms (states written before "pairs" was recorded lack the count)."""
        was, now = state.get("pairs"), len(self.shapes)
        mode, why = state.get("small_buckets"), []
        if state["seed"] != self.seed:
            why.append(f"seed {state['seed']} then, {self.seed} now")
        if was is not None and was != now:
            why.append(f"{was} training pairs then, {now} now")
        if mode is not None and mode != ("repeat" if self.pad else "drop"):
            why.append(f"small buckets {mode!r} then, {'repeat' if self.pad else 'drop'!r} now")
        if not why:
            why.append(f"the pairs' latent shapes differ ({now} pairs now"
                       + (")" if was is not None else "; the state does not record how many then)"))
        return f"{'; '.join(why)} (fingerprint {state['fingerprint']} then, {self.fingerprint} now)"

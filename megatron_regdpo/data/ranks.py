"""The ranks of a torchrun job that fill one GT-Pair store: who does which clip, who commits, what rank 0 shows.

Work is split over data-parallel groups: the sorted list of clips still to do is the same on every rank (all
read the same commit log after rank 0 opened the store), and DP group g takes items g, g + G, g + 2G, ...
Within a group (TP/CP ranks of one model) every rank computes and only the group's first rank writes.

Work goes in rounds of one item per group. After each round `Job.sync` gathers what every rank queued (its
commit records and a small payload: skips, counts) over a gloo group; rank 0, which alone holds the store's
writer lock, appends the commits to the log, and every rank learns them. So the log has one writer, an id is
never committed twice (`GTPairStore.commit_records` skips a known one), and a kill at any point leaves only
uncommitted arrays that the next run overwrites. The round is also when rank 0 advances the progress bar
with the clips of all ranks.

Without torchrun (or with one rank) the same code runs with a world of one and no collectives.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class Job:
    rank: int = 0
    world: int = 1
    dp_rank: int = 0          # which data-parallel group this rank belongs to
    dp_size: int = 1
    writer: bool = True       # the first rank of its group: writes the group's arrays
    control: object = field(default=None, repr=False)  # a gloo group for the object collectives (None: default)
    owned: bool = False       # this Job initialised torch.distributed (and ends it in `close`)

    @property
    def lead(self) -> bool:
        """Rank 0: holds the store's writer lock, appends commits, prints the progress bar and summary."""
        return self.rank == 0

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def share(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.lead else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def by_lead(self, fn):
        """fn() run by rank 0 alone, its result on every rank (one work list for all: a folder still being
        filled cannot give two ranks two lists); a ValueError it raises is raised on every rank."""
        result = None
        if self.lead:
            try:
                result = ("ok", fn())
            except ValueError as e:
                result = ("error", str(e))
        kind, value = self.share(result)
        if kind == "error":
            raise ValueError(value)
        return value

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.control)

    def sync(self, store, payload=None) -> list:
        """End of a round: the commits every rank queued become committed (rank 0 writes them to the log);
        returns every rank's payload, in rank order."""
        mine = (store.queue[:] if store.queue is not None else [], payload)
        if store.queue is not None:
            store.queue.clear()
        parts = self.gather(mine)
        if self.world > 1:
            duplicates = sum(store.commit_records(records, write=self.lead) for records, _ in parts)
            if duplicates and self.lead:
                print(f"warning: {duplicates} samples were made twice this round; each is committed once",
                      file=sys.stderr, flush=True)
        return [p for _, p in parts]

    def end_round(self, store, outcome, counts, report, bar) -> None:
        """End of a round of one item per group: `outcome` is this rank's, None (no item), ("skip", report.last)
        or (kind, key). Every rank's outcome advances `bar`; a (kind, key) counts counts[key]; another rank's
        skip goes to `report` (counted; rank 0 writes it down)."""
        for rank, part in enumerate(self.sync(store, outcome)):
            if part is None:
                continue
            bar.update(1)
            if part[0] != "skip":
                counts[part[1]] += 1
            elif rank != self.rank:
                report.take(part[1])

    def finish(self, store, bar) -> None:
        """After the last round: rank 0 rewrites the store's index; nobody reads or leaves before it is written."""
        bar.close()
        if self.lead:
            store.finalize()
        self.barrier()

    def agree(self, error: str | None) -> None:
        """Raise ValueError on every rank when any rank had an error (the first one's message): a failed open
        on rank 0 stops all ranks at once instead of leaving them waiting in a collective."""
        errors = [e for e in self.gather(error or "") if e]
        if errors:
            raise ValueError(errors[0])

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def launched() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_job(device: str = "cpu") -> Job:
    """The Job of this process for a tool that needs no model-parallel groups (preprocessing): every rank is
    its own data-parallel group. Initialises torch.distributed under torchrun (gloo, or nccl with a gloo
    control group for device="cuda")."""
    if not launched() and not dist.is_initialized():
        return Job()
    owned = not dist.is_initialized()
    if owned:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    return Job(rank, world, rank, world, True, _control_group(), owned)


def model_job(pg) -> Job:
    """The Job of a rank whose model runs on the megatron process groups `pg` (negative generation at TP/CP):
    one data-parallel group per model replica; its TP rank 0 / CP rank 0 writes."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Job()
    if dist.get_world_size(pg.pp) > 1:
        raise ValueError("negatives are generated with tensor and/or context parallelism, not pipeline stages: "
                         "drop --pp")
    writer = dist.get_rank(pg.tp) == 0 and dist.get_rank(pg.cp) == 0
    return Job(dist.get_rank(), dist.get_world_size(), dist.get_rank(pg.dp), dist.get_world_size(pg.dp), writer,
               _control_group())


def _control_group():
    """None (the default group) when it is gloo; else a gloo group of all ranks for the Python objects."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def open_store(job: Job, path: str | Path, open_lead):
    """Rank 0 opens the store with `open_lead()` (create or resume, take the writer lock, check settings); the
    others open it after that, shared (arrays only, commits queued). Errors stop every rank (`Job.agree`)."""
    from megatron_regdpo.data.store import GTPairStore

    store, error = None, None
    if job.lead:
        try:
            store = open_lead()
        except ValueError as e:
            error = str(e)
    job.agree(error)
    if not job.lead:
        store = GTPairStore(path, mode="a", shared=True)
    elif job.world > 1:
        store.queue = []  # rank 0 queues too: every commit goes through Job.sync, in rank order
    return store


def says_errors() -> bool:
    """Every rank raises the same error: rank 0 prints it (one `error:` line per job)."""
    return os.environ.get("RANK", "0") == "0"


def shard(items: list, job: Job) -> list:
    return items[job.dp_rank::job.dp_size]


def rounds(total: int, job: Job) -> int:
    return -(-total // job.dp_size)

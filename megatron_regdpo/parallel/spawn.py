"""Spawn gloo ranks on one CPU machine and collect what each returns.

Used by the CPU benchmarks, the demo and the distributed tests. Spawning costs an interpreter plus
megatron/diffusers imports per rank (~10 s on 2 cores), so callers run many cases in one world.
"""
from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from .groups import free_port


def _entry(rank: int, world: int, port: int, fn, payload, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    try:
        result = fn(rank, world, payload)
        torch.save({"ok": True, "result": result}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001 -- hand any failure to the parent with its traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        raise
    finally:
        # a rank that exits with its process group still up can abort in C++ teardown ("terminate called
        # without an active exception", SIGABRT) while gloo's threads still run: tear it down first
        from .groups import destroy_distributed

        destroy_distributed()


def run_world(world: int, fn, payload) -> list:
    """Run `fn(rank, world, payload)` on `world` spawned CPU ranks; return the per-rank results.
    `fn` must be importable (module level); a failing rank's traceback is re-raised here."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_entry, args=(world, free_port(), fn, payload, out_dir), nprocs=world,
                               join=True, start_method="spawn")
        except mp.ProcessRaisedException:
            pass  # the rank's own traceback is in its result file
        results = []
        for r in range(world):
            path = Path(out_dir) / f"rank{r}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {r} wrote no result (crashed or was killed)")
            res = torch.load(path, weights_only=False)
            if not res["ok"]:
                raise RuntimeError(f"rank {r} failed:\n{res['error']}")
            results.append(res["result"])
        return results

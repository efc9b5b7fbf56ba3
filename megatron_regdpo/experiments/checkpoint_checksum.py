"""What checkpoint checksums cost: save, hash (write_manifest), verify and load a ~1 GiB torch_dist
checkpoint of random fp32 tensors (docs/benchmarks.md, "Checkpoint checksums").

    python -m megatron_regdpo.experiments.checkpoint_checksum /tmp/ckbench [--gib 1]

Loads alternate plain dist_checkpointing.load with safe_dist_load (verify + restricted unpicklers), so
neither gains from the page cache the other warmed. The folder is removed afterwards.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_regdpo.checkpoint_io import integrity
from megatron_regdpo.checkpoint_io.megatron_ckpt import safe_dist_load, save_sharded
from megatron_regdpo.parallel.groups import init_distributed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--gib", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    init_distributed()
    shutil.rmtree(args.folder, ignore_errors=True)
    args.folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(16 * 2**20, generator=gen) for i in range(16 * args.gib)}  # 64 MiB each

    def request(fill: bool) -> dict:
        return {k: ShardedTensor.from_rank_offsets(k, v if fill else torch.empty_like(v)) for k, v in tensors.items()}

    def timed(label: str, fn) -> None:
        start = time.perf_counter()
        fn()
        print(f"{label}: {time.perf_counter() - start:.2f} s", flush=True)

    try:
        timed("save (dist_checkpointing, torch_dist)", lambda: save_sharded(request(True), args.folder))
        size = sum(p.stat().st_size for p in args.folder.iterdir())
        print(f"checkpoint: {size / 2**30:.2f} GiB in {len(list(args.folder.iterdir()))} files")
        timed("write_manifest (sha256 of every file)", lambda: integrity.write_manifest(args.folder))
        timed("verify", lambda: integrity.verify(args.folder))
        for r in range(args.repeats):
            timed(f"load, plain dist_checkpointing #{r}",
                  lambda: dist_checkpointing.load(request(False), str(args.folder)))
            timed(f"load, safe_dist_load #{r}", lambda: safe_dist_load(request(False), args.folder))
    finally:
        shutil.rmtree(args.folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

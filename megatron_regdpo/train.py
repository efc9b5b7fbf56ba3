"""Entry point: `python -m megatron_regdpo.train --config RECIPE [--dry-run --world-size N] [key.sub=value ...]`.

--dry-run validates the recipe against N ranks without any GPU and prints the resolved config, the
parallel layout, the parameter count (the full model built on the meta device) and the per-stage split.
Without --dry-run it trains Reg-DPO on `data.store` (resuming from the run folder's `latest` checkpoint);
without a store it runs one real model step, saves and reloads a checkpoint (megatron_regdpo.smoke).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from megatron_regdpo.config import ConfigError, dump_yaml, load_config, validate
from megatron_regdpo.models.wan.arch import resolve_arch


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m megatron_regdpo.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML recipe (see recipes/)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the layout; run nothing")
    ap.add_argument("--world-size", type=int, default=None,
                    help="ranks to validate against (default: $WORLD_SIZE or 1)")
    ap.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    return ap.parse_args(argv)


def stage_parameter_counts(model, layers_per_stage: tuple[int, ...]) -> list[int]:
    """Parameters held by each pipeline stage of the full model (conditioning is on every stage)."""
    counts = [0] * len(layers_per_stage)
    bounds = [sum(layers_per_stage[:i + 1]) for i in range(len(layers_per_stage))]
    for name, p in model.named_parameters():
        m = re.match(r"decoder\.layers\.(\d+)\.", name)
        if m:
            counts[next(s for s, b in enumerate(bounds) if int(m.group(1)) < b)] += p.numel()
        elif name.startswith("patch_embedding"):
            counts[0] += p.numel()
        elif name.startswith(("proj_out", "scale_shift_table")):
            counts[-1] += p.numel()
        else:
            counts = [c + p.numel() for c in counts]
    return counts


def dry_run(cfg, world_size: int) -> int:
    import torch

    from megatron_regdpo.models.wan.build import build_wan, count_parameters
    from megatron_regdpo.parallel.groups import distributed_session

    arch = resolve_arch(cfg.model)
    layout = validate(cfg, world_size, arch)
    with distributed_session(world_size=1) as pg, torch.device("meta"):  # one process: count the full model, not a shard
        model = build_wan(arch, pg, init_weights=False)
    total = count_parameters(model)
    per_stage = stage_parameter_counts(model, layout.layers_per_stage)
    print("# resolved config")
    print(dump_yaml(cfg).rstrip())
    print("# architecture")
    print(f"Wan2.1 {cfg.model.size} {arch.task}: {arch.num_layers} layers, hidden {arch.hidden} "
          f"({arch.num_heads} heads x {arch.head_dim}), ffn {arch.ffn_dim}, in_channels {arch.in_channels}")
    print("# layout")
    print(layout.describe())
    print("# parameters")
    print(f"total: {total:,}")
    for s, n in enumerate(per_stage):
        print(f"stage {s}: {n:,} (before TP sharding; conditioning replicated on every stage)")
    print("valid: yes")
    return 0


def lock_run_folder(cfg):
    """Rank 0 locks the run folder (megatron_regdpo.parallel.lock) and every rank learns whether it could:
    a second run on the folder then stops on every rank at once instead of hanging in a collective."""
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from megatron_regdpo.parallel.lock import FolderLock, LockHeld

    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    lock, error = None, ""
    if dist.get_rank() == 0:
        try:
            lock = FolderLock(run_dir / "run.lock", f"run folder {run_dir}").acquire()
        except LockHeld as e:
            error = str(e)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    held = torch.tensor([1.0 if error else 0.0], device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(held, op=dist.ReduceOp.MAX)
    if held.item():
        raise LockHeld(error)  # empty on the other ranks: rank 0 names the holder
    return lock


def run_training(cfg) -> int:
    import contextlib

    import torch.distributed as dist

    from megatron_regdpo.parallel.groups import distributed_session
    from megatron_regdpo.training.metrics_log import MetricsLogger
    from megatron_regdpo.training.setup import build_run
    from megatron_regdpo.training.startup import summary
    from megatron_regdpo.training.trainer import train

    p = cfg.parallel
    with distributed_session(p.tp, p.pp, p.cp, seed=cfg.run.seed) as pg, contextlib.ExitStack() as held:
        lock = lock_run_folder(cfg)   # before build_run: it resumes from, and prunes, the folder's checkpoints
        if lock is not None:
            held.callback(lock.release)
        run = build_run(cfg, pg)
        rank, world = dist.get_rank(), dist.get_world_size()
        writer = (p.pp - 1) * world // p.pp  # rank 0's last pipeline stage holds the loss (pp is outermost)
        with MetricsLogger(run.run_dir, cfg.logging, rank, world, total_steps=cfg.schedule.train_steps,
                           start_step=run.start_step, run_name=cfg.run.name, config=cfg.to_dict(),
                           writer_rank=writer) as log:
            if log.active:
                log.message(summary(run))  # before step 1: what this run does, and where it starts
            return train(run, log)


def main(argv=None) -> int:
    from megatron_regdpo.training.startup import announce_hidden, hide_known_warnings

    from megatron_regdpo.training.lifecycle import exit_with_launcher, parse_on_every_rank, take_stop_signals

    take_stop_signals()     # launch/torchrun.sh hands them down ignored
    exit_with_launcher()    # under torchrun: a worker does not outlive its launcher
    args = parse_on_every_rank(parse_args, argv)
    hidden = hide_known_warnings()   # before anything imports megatron-core: it warns on import
    from megatron_regdpo.checkpoint_io.integrity import CheckpointError
    from megatron_regdpo.parallel.lock import LockHeld
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(cfg, world_size)
        validate(cfg, world_size, resolve_arch(cfg.model))
        announce_hidden(hidden)   # the run starts: one line, not one per hidden warning
        if cfg.data.store is None:  # nothing to train on: one real step of the model, checkpoint, reload
            from megatron_regdpo.smoke import run_smoke

            return run_smoke(cfg)
        return run_training(cfg)
    except (ConfigError, FileNotFoundError) as e:
        if _says_errors():
            print(f"invalid config: {e}", file=sys.stderr)
        return 2
    except LockHeld as e:
        if str(e):
            print(f"error: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:
        if _says_errors():
            print(f"error: {e}", file=sys.stderr)
        return 1


def _says_errors() -> bool:
    """Every rank reads the same config, store and checkpoint and raises the same error: the first process of
    each node says it (one line on one node; a file missing on one node only is still reported there)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())

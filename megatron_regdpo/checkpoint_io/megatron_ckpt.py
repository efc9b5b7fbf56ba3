"""Megatron-Core distributed checkpoints of a model (dist_checkpointing, torch_dist format).

A checkpoint folder also carries `model.json` (family + architecture), so tools can rebuild the model
without a recipe. dist_checkpointing reshards on load: save under one parallel layout, load under another.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

META_FILE = "model.json"


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_model(model: torch.nn.Module, ckpt_dir: str | Path, meta: dict) -> None:
    """Write aside (`<dir>.partial`) and publish by rename, so a crash never leaves a half checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists() and (not ckpt_dir.is_dir() or any(ckpt_dir.iterdir())):
        raise FileExistsError(f"checkpoint folder {ckpt_dir} exists and is not empty; refusing to overwrite it")
    partial = ckpt_dir.with_name(ckpt_dir.name + ".partial")
    rank0 = is_rank0()
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(partial),
                            sharded_strategy=get_default_save_sharded_strategy("torch_dist"))
    if rank0:
        (partial / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if ckpt_dir.exists():
            ckpt_dir.rmdir()
        partial.rename(ckpt_dir)
    barrier()


def read_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {ckpt_dir} is not a megatron_regdpo model checkpoint")
    return json.loads(path.read_text())


def load_model(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """The model's tensors from a model checkpoint or a training checkpoint (which also holds optimizer
    and trainer state: dist_checkpointing returns those common entries too; they are not the model's)."""
    wanted = model.sharded_state_dict()
    state = dist_checkpointing.load(wanted, str(ckpt_dir))
    model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)

"""A damaged checkpoint under TP2 is one CheckpointError, the same on both ranks and naming the file, even
when the rank that finds the damage is not the one that reads the file (each rank hashes a share)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _harness import run_world

pytestmark = pytest.mark.distributed


def damaged_load(rank: int, world: int, payload: dict) -> dict:
    from megatron_regdpo.checkpoint_io.integrity import CheckpointError
    from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model, save_model
    from megatron_regdpo.models.wan.arch import SIZES
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.parallel.groups import init_distributed

    pg = init_distributed(tp=2)
    folder = Path(payload["folder"])
    torch.manual_seed(0)
    save_model(build_wan(SIZES["debug"], pg), folder, {})
    if rank == 0:
        files = sorted(folder.glob("*.distcp"))
        data = bytearray(files[-1].read_bytes())
        data[len(data) // 2] ^= 1
        files[-1].write_bytes(bytes(data))
        damaged = files[-1].name
    else:
        damaged = None
    torch.distributed.barrier()
    try:
        load_model(build_wan(SIZES["debug"], pg, init_weights=False), folder)
    except CheckpointError as e:
        return {"error": str(e), "damaged": damaged}
    return {"error": None, "damaged": damaged}


def test_damage_is_one_error_on_every_rank(tmp_path):
    first, second = run_world(2, damaged_load, {"folder": str(tmp_path / "ck")})
    assert first["error"] is not None and first["error"] == second["error"]
    assert f"{first['damaged']}: does not match its sha256" in first["error"]

"""Damaged model checkpoints are one clear error naming the file (issue 14, item 5); crafted ones run
nothing (item 6). Tests take ValueError and import CheckpointError late, so they also run (and fail for the
right reason) against the code before these checks existed."""
from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch

from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model, save_model
from megatron_regdpo.models.wan.arch import SIZES
from megatron_regdpo.models.wan.build import build_wan


class RunsCommand:
    """Unpickles into `touch marker`: what a crafted checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def ckpt(pg, tmp_path):
    torch.manual_seed(1)
    save_model(build_wan(SIZES["debug"], pg), tmp_path / "ck", {"family": "wan2.1"})
    return tmp_path / "ck"


def _fresh(pg):
    torch.manual_seed(2)
    return build_wan(SIZES["debug"], pg, init_weights=False)


def _reseal(folder):
    """What an attacker does: a manifest that matches the crafted files (none before manifests existed)."""
    try:
        from megatron_regdpo.checkpoint_io.integrity import write_manifest
    except ImportError:
        return
    write_manifest(folder)


def _payload(folder):
    return max((p for p in folder.glob("*.distcp")), key=lambda p: p.stat().st_size)


def test_flipped_payload_byte_is_an_error_naming_the_file(pg, ckpt):
    target = _payload(ckpt)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x40   # somewhere inside a weight: DCP itself would load it silently
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{target.name}: does not match its sha256"):
        load_model(_fresh(pg), ckpt)


def test_truncated_distcp_is_an_error_naming_the_file(pg, ckpt):
    target = _payload(ckpt)
    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{target.name}: has 1000 bytes, \d+ were written \(truncated\?\)"):
        load_model(_fresh(pg), ckpt)


def test_missing_metadata_is_an_error_naming_it(pg, ckpt):
    (ckpt / ".metadata").unlink()
    with pytest.raises(ValueError, match=r"\.metadata: is missing"):
        load_model(_fresh(pg), ckpt)


def _refused_unverified(model, ckpt, wanted: str):
    """Loading ckpt (no manifest) fails with `wanted`, having said it loads unverified; every warning is
    recorded here (torch and DCP add their own remarks on the garbage), none leaks into the suite."""
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError, match=wanted):
        warnings.simplefilter("always")
        load_model(model, ckpt)
    assert any("no checksums.json" in str(w.message) for w in caught)


def test_garbage_common_state_without_manifest_is_one_clear_error(pg, ckpt):
    (ckpt / "checksums.json").unlink(missing_ok=True)   # as a checkpoint from before manifests
    (ckpt / "common.pt").write_bytes(b"\x80\x04garbage")  # 0.16 reads it; 0.19 reads it when present
    _refused_unverified(_fresh(pg), ckpt, rf"checkpoint {ckpt}/common\.pt: is not a readable torch file")


def test_garbage_metadata_without_manifest_names_it(pg, ckpt):
    (ckpt / "checksums.json").unlink(missing_ok=True)
    (ckpt / ".metadata").write_bytes(b"\x80\x04garbage")
    _refused_unverified(_fresh(pg), ckpt, rf"checkpoint {ckpt}/\.metadata: is not readable DCP metadata")


def test_checkpoint_without_manifest_loads_with_one_warning(pg, ckpt):
    (ckpt / "checksums.json").unlink(missing_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(_fresh(pg), ckpt)
    ours = [w for w in caught if "checksums.json" in str(w.message)]
    assert len(ours) == 1 and "unverified" in str(ours[0].message)


def test_crafted_metadata_runs_nothing(pg, ckpt, tmp_path):
    marker = tmp_path / "ran"
    (ckpt / ".metadata").write_bytes(pickle.dumps(RunsCommand(marker)))
    _reseal(ckpt)
    with pytest.raises(ValueError, match=r"\.metadata: names posix\.system.*refused, nothing from it was run"):
        load_model(_fresh(pg), ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("force_unsafe", [False, True])
def test_crafted_common_pt_runs_nothing(pg, ckpt, tmp_path, monkeypatch, force_unsafe):
    # megatron reads common.pt with torch.load's default: weights_only only since torch 2.6, and this
    # environment variable (or an older torch) turns it off
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"
    torch.save({"payload": RunsCommand(marker)}, ckpt / "common.pt")
    _reseal(ckpt)
    with pytest.raises(ValueError, match=r"common\.pt: is not plain data.*refused, nothing from it was run"):
        load_model(_fresh(pg), ckpt)
    assert not marker.exists()


def test_crafted_sharded_object_runs_nothing(pg, tmp_path):
    # DCP's load_bytes unpickles sharded objects (our RNG state, TE extra state) with weights_only=False
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_regdpo.checkpoint_io.megatron_ckpt import load_sharded, save_sharded
    marker, folder = tmp_path / "ran", tmp_path / "objck"
    folder.mkdir()
    save_sharded({"obj": ShardedObject("obj", RunsCommand(marker), (1,), (0,), replica_id=0)}, folder)
    _reseal(folder)
    with pytest.raises(ValueError, match=r"a sharded object is not plain data.*nothing from it was run"):
        load_sharded({"obj": ShardedObject("obj", None, (1,), (0,), replica_id=0)}, folder)
    assert not marker.exists()


def test_restricted_unpicklers_are_active_only_inside_our_load(pg, ckpt):
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    from megatron_regdpo.checkpoint_io.safe_load import is_active, safe_unpickling
    plain = (torch.load, dcp_filesystem.pickle)
    assert dcp_filesystem.pickle is pickle and not is_active()
    with safe_unpickling():
        assert is_active() and torch.load is not plain[0] and dcp_filesystem.pickle is not pickle
    with pytest.raises(RuntimeError), safe_unpickling():
        raise RuntimeError("a failed load")
    load_model(_fresh(pg), ckpt)
    assert (torch.load, dcp_filesystem.pickle) == plain and not is_active()

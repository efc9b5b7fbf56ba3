"""CPU patches for megatron-core's dist_checkpointing: active on this CPU machine, never on a GPU one;
and the Megatron checkpoint round trip they make possible."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_regdpo.checkpoint_io.megatron_ckpt import META_FILE, load_model, read_meta, save_model
from megatron_regdpo.models.wan.arch import SIZES
from megatron_regdpo.models.wan.build import build_wan
from megatron_regdpo.parallel import cpu_compat

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_patches_active_on_cpu_after_init(pg):
    from megatron.core.dist_checkpointing.strategies import state_dict_saver

    active = cpu_compat.active()
    assert active, "no CPU patch active after init_distributed on a CPU-only machine"
    assert len(set(active)) == len(active)
    # the two that dist_checkpointing.save needs on CPU (each entry says what it answers)
    assert any("preload_tensors" in a for a in active), active
    assert any("state_dict_saver" in a for a in active), active
    assert cpu_compat.apply() == active  # idempotent: applying again installs nothing new
    assert cpu_compat.active() == active
    # the failure-flag broadcast of save_state_dict_async_finalize sees a CPU "current device"
    assert state_dict_saver.torch is not torch
    assert state_dict_saver.torch.cuda.current_device() == "cpu"
    assert state_dict_saver.torch.cuda.synchronize() is None
    assert state_dict_saver.torch.float32 is torch.float32  # everything else is the real torch


def test_distributed_optimizer_state_gather_stays_on_cpu(pg):
    # DistributedOptimizer.get_parameter_state_dp_zero (a fully_reshardable checkpoint save) calls
    # send_tensor.cuda(): on CPU the call is rewritten to the lens's device, the CPU; tests/distributed/
    # test_dist_optimizer_ckpt.py saves and resumes through it
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    assert any("get_parameter_state_dp_zero" in a for a in cpu_compat.active()), cpu_compat.active()
    gather = DistributedOptimizer.get_parameter_state_dp_zero
    assert gather in cpu_compat._RECOMPILED
    assert gather.__globals__["torch"].cuda.current_device() == "cpu"


# Pretend to be a GPU machine, import everything apply() could touch, snapshot it, apply, compare by identity.
_GPU_PROBE = textwrap.dedent("""
    import importlib, sys
    import torch
    torch.cuda.is_available = lambda: True
    from megatron_regdpo.parallel import cpu_compat  # importing it patches nothing
    assert cpu_compat.active() == []
    from megatron.core.dist_checkpointing.strategies import state_dict_saver
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    import megatron.core.tensor_parallel.random
    for name in getattr(cpu_compat, "LENSED_MODULES", {}):
        importlib.import_module(name)
    original_preload = FileSystemWriterAsync.__dict__["preload_tensors"]
    original_torch = state_dict_saver.torch
    modules = {n: m for n, m in sys.modules.items() if n.startswith("megatron") and m is not None}
    before = {n: dict(vars(m)) for n, m in modules.items()}
    before_cls = dict(vars(FileSystemWriterAsync))

    assert cpu_compat.apply() == [], cpu_compat.active()
    assert cpu_compat.apply() == []
    assert cpu_compat.active() == []
    assert FileSystemWriterAsync.__dict__["preload_tensors"] is original_preload
    assert state_dict_saver.torch is original_torch is torch
    assert dict(vars(FileSystemWriterAsync)) == before_cls
    for n, m in modules.items():
        after = vars(m)
        assert after.keys() == before[n].keys(), n
        changed = [k for k in after if after[k] is not before[n][k]]
        assert not changed, (n, changed)
    # the modules apply() would lens still see the real torch (elsewhere a global named `torch` may be
    # something else: from 0.17 `megatron.core.dist_checkpointing.strategies.torch` is a submodule)
    for n in getattr(cpu_compat, "LENSED_MODULES", {}):
        assert sys.modules[n].torch is torch, n
    print(f"untouched ({len(modules)} megatron modules checked)")
""")


def test_never_active_on_a_gpu_machine():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-c", _GPU_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "untouched" in res.stdout


# --------------------------------------------------------------------------- save_model / load_model

@pytest.fixture(scope="module")
def model(pg):
    torch.manual_seed(11)
    return build_wan(SIZES["debug"], pg)


META = {"family": "wan2.1", "note": "test"}


def test_save_load_round_trip(pg, model, tmp_path):
    ckpt = tmp_path / "ckpt"
    save_model(model, ckpt, META)
    assert (ckpt / META_FILE).is_file()
    assert read_meta(ckpt) == META
    assert not (tmp_path / "ckpt.partial").exists()
    torch.manual_seed(12)
    other = build_wan(SIZES["debug"], pg)
    want = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    before = {k: v for k, v in other.state_dict().items() if isinstance(v, torch.Tensor)}
    assert any(not torch.equal(before[k], want[k]) for k in want)  # a different init, so the load matters
    load_model(other, ckpt)
    got = {k: v for k, v in other.state_dict().items() if isinstance(v, torch.Tensor)}
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_save_into_empty_existing_folder(pg, model, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_model(model, ckpt, META)
    assert read_meta(ckpt) == META
    assert not (tmp_path / "ckpt.partial").exists()


def test_save_refuses_non_empty_folder(pg, model, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        save_model(model, ckpt, META)
    assert [p.name for p in ckpt.iterdir()] == ["keep.txt"]
    assert (ckpt / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "ckpt.partial").exists()


def test_read_meta_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=META_FILE):
        read_meta(tmp_path)

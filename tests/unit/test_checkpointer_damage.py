"""A damaged or missing newest training checkpoint names the problem and the previous kept checkpoint,
with the command that resumes from it; that command works (issue 14, item 5)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_regdpo.training.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(pg, tmp_path_factory):
    """Model, optimizer and a checkpoint folder holding iter_0000001 and iter_0000002 (keep=2)."""
    from megatron_regdpo.config import load_config
    from megatron_regdpo.models.wan.arch import SIZES
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.parallel.data_parallel import wrap_data_parallel
    from megatron_regdpo.training.optimizer import build_optimizer

    cfg = load_config(ROOT / "recipes" / "debug" / "tiny_cpu.yaml", ["optim.clip_grad=0"])
    torch.manual_seed(0)
    ddp = wrap_data_parallel(build_wan(SIZES["debug"], pg), cfg.parallel, pg)
    opt = build_optimizer(cfg.optim, cfg.parallel, torch.float32, [ddp], pg)
    for p in ddp.parameters():  # one step, so the checkpoints hold Adam state as a trainer's do
        p.grad = p.main_grad = torch.zeros_like(p)
    opt.step()
    root = tmp_path_factory.mktemp("ckpts") / "checkpoints"
    ck = Checkpointer(root, keep=2, meta={"family": "wan2.1"})
    for step in (1, 2):
        ck.save(step, [ddp], opt, {"sampler": {"epoch": 0, "pos": step}})
    return ddp, opt, root


@pytest.fixture
def root(trained, tmp_path):
    copy = tmp_path / "checkpoints"
    shutil.copytree(trained[2], copy)
    return copy


def _run(hint: str) -> None:
    command = hint.split("to resume from it run: ", 1)[1]
    subprocess.run(command, shell=True, check=True)


def test_latest_naming_a_missing_folder_names_it_and_the_previous_one(trained, root):
    shutil.rmtree(root / "iter_0000002")
    with pytest.raises(ValueError, match=r"latest: names iter_0000002, which does not exist") as e:
        Checkpointer(root).latest()
    assert f"the previous kept checkpoint is {root / 'iter_0000001'}" in str(e.value)
    _run(str(e.value))
    assert Checkpointer(root).latest() == root / "iter_0000001"


def test_damaged_newest_checkpoint_names_the_file_and_offers_the_previous_one(trained, root):
    ddp, opt, _ = trained
    newest = root / "iter_0000002"
    payload = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(payload.read_bytes())
    data[len(data) // 3] ^= 1
    payload.write_bytes(bytes(data))
    ck = Checkpointer(root)
    with pytest.raises(ValueError, match=rf"{payload.name}: does not match its sha256") as e:
        ck.load(ck.latest(), [ddp], opt)
    assert f"the previous kept checkpoint is {root / 'iter_0000001'}" in str(e.value)
    _run(str(e.value))   # moves the damaged one aside and points `latest` at the previous one
    assert ck.latest() == root / "iter_0000001" and not newest.exists()
    assert ck.load(ck.latest(), [ddp], opt)["step"] == 1


def test_only_checkpoint_damaged_says_none_is_kept(trained, root):
    ddp, opt, _ = trained
    shutil.rmtree(root / "iter_0000001")
    (root / "iter_0000002" / ".metadata").unlink()
    with pytest.raises(ValueError, match=r"\.metadata: is missing.*no earlier checkpoint is kept"):
        Checkpointer(root).load(root / "iter_0000002", [ddp], opt)


def test_manifest_covers_every_file_of_a_training_checkpoint(trained):
    import json
    folder = trained[2] / "iter_0000002"
    listed = set(json.loads((folder / "checksums.json").read_text())["files"])
    assert listed == {p.name for p in folder.iterdir()} - {"checksums.json"}
    assert {"metadata.json", "model.json", ".metadata"} <= listed

"""The recipe against what it reads, before any model is built: the base checkpoint's architecture
(model.json), the store's task, geometry, text length and channels, the reference cache's noise and model
settings, and shape buckets too small for one global batch (issue 14, items 3 and 4)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_regdpo.data.store import GTPairStore
from megatron_regdpo.models.wan.arch import SIZES

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "debug" / "tiny_cpu.yaml")
ATTRS = {"task": "t2v", "fps": 16, "frames": 9, "short_side": 64, "bucket": "1:1", "latent_dtype": "bf16",
         "text_len": 16, "text_encoder": {"dim": 32}}


def make_store(path: Path, shapes, attrs=ATTRS) -> Path:
    """One pair per latent shape in `shapes` (C, F, h, w), random latents; no video is decoded."""
    store = GTPairStore.open_or_create(path, attrs)
    for i, shape in enumerate(shapes):
        pid = f"p{i}"
        store.write_text(pid, torch.randn(attrs["text_len"], 32), torch.arange(attrs["text_len"]) < 4, f"c{i}")
        store.write_real(f"r{i}", torch.randn(shape), {"prompt_id": pid})
        store.write_generated(f"r{i}.g", torch.randn(shape), {"real_id": f"r{i}", "generator": "g", "k": 0})
    store.finalize()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("s") / "pairs.zarr", [(16, 3, 8, 8)] * 3)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, pg):
    """The debug model (4 heads x 16) and a shape-compatible variant (2 heads x 32): the same tensor shapes."""
    from megatron_regdpo.checkpoint_io.megatron_ckpt import save_model
    from megatron_regdpo.models.wan.build import build_wan

    root = tmp_path_factory.mktemp("ckpt")
    for name, arch in (("debug", SIZES["debug"]), ("2x32", dataclasses.replace(SIZES["debug"], num_heads=2,
                                                                                head_dim=32))):
        save_model(build_wan(arch, pg), root / name, {"family": "wan2.1", "arch": dataclasses.asdict(arch),
                                                      "dtype": "torch.float32"})
    return {k: root / k for k in ("debug", "2x32")}


def _train(store, out, *extra):
    from megatron_regdpo.train import main

    return main(["--config", RECIPE, f"data.store={store}", f"run.output_dir={out}", "schedule.train_steps=1",
                 *extra])


def _refused(capsys, rc) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and "invalid config: " in err, err   # (megatron-core 0.19 warns on stderr too)
    return err


def test_checkpoint_with_other_heads_is_refused_and_from_checkpoint_trains_it(store, ckpts, tmp_path, capsys):
    err = _refused(capsys, _train(store, tmp_path, f"checkpoint.load={ckpts['2x32']}"))
    assert f"model.num_heads=4 (model.size='debug') but {ckpts['2x32'] / 'model.json'} has num_heads=2" in err
    assert "model.head_dim=16" in err and "head_dim=32" in err and not list(tmp_path.rglob("iter_*"))
    assert _train(store, tmp_path, f"checkpoint.load={ckpts['2x32']}", "model.size=from_checkpoint") == 0
    saved = json.loads(next((tmp_path / "tiny-cpu" / "checkpoints").glob("iter_*/model.json")).read_text())
    assert (saved["arch"]["num_heads"], saved["arch"]["head_dim"]) == (2, 32)   # what it trained: the checkpoint's
    err = _refused(capsys, _train(store, tmp_path / "b", f"checkpoint.load={ckpts['2x32']}",
                                  "model.size=from_checkpoint", "model.num_heads=4"))
    assert "model.num_heads=4 but" in err and "has num_heads=2; drop model.num_heads" in err


def test_from_checkpoint_needs_a_checkpoint(capsys, tmp_path):
    err = _refused(capsys, _train(tmp_path / "none", tmp_path, "model.size=from_checkpoint"))
    assert "model.size=from_checkpoint needs checkpoint.load" in err


def test_store_with_other_text_len_is_refused(store, tmp_path, capsys):
    err = _refused(capsys, _train(store, tmp_path, "data.text_len=32"))
    assert f"{store}: the store has text_len=16, the recipe has data.text_len=32" in err


def test_store_geometry_channels_and_task_are_compared(tmp_path):
    from megatron_regdpo.config import load_config
    from megatron_regdpo.models.wan.arch import resolve_arch
    from megatron_regdpo.training.consistency import store_errors

    cfg = load_config(RECIPE, ["data.frames=17", "data.width=128"])
    errors = store_errors(cfg, resolve_arch(cfg.model), "S", {**ATTRS, "task": "i2v"}, [(4, 3, 8, 8)] * 2)
    text = "\n".join(errors)
    assert "S: the store has task='i2v', the recipe has the model's task" in text and "'t2v'" in text
    assert "the store has frames=9, the recipe has data.frames=17" in text
    assert "(64, 64), the recipe has (data.height, data.width)=(64, 128)" in text
    assert "2 pair(s) have 4 latent channels" in text and "in_channels=16" in text
    assert "latent (frames, height, width) [3, 8, 8]" in text and "give [5, 8, 16]" in text


def _cache(store, ckpt, shift):
    from megatron_regdpo.objectives.flow_matching import FlowMatchingSettings
    from megatron_regdpo.reference import checkpoint_fingerprint, write_reference_cache

    return write_reference_cache(
        Path(store) / "reference_cache", [0, 1, 2], [0, 0, 0], [1.0] * 3, [2.0] * 3, seed=1234, step=0,
        flow_matching=FlowMatchingSettings(shift=shift), overwrite=True,
        model={"checkpoint": str(ckpt), "checkpoint_id": checkpoint_fingerprint(ckpt), "dtype": "torch.float32"})


def test_reference_cache_with_other_shift_or_checkpoint_is_refused(ckpts, tmp_path, capsys):
    store = make_store(tmp_path / "pairs.zarr", [(16, 3, 8, 8)] * 3)
    cache = _cache(store, ckpts["debug"], shift=3.0)
    args = ("objective.reference.mode=cached", "objective.shift=5.0")
    err = _refused(capsys, _train(store, tmp_path, f"checkpoint.load={ckpts['debug']}", *args))
    assert f"{cache} was computed with flow_matching.shift=3.0; the recipe has objective.shift=5.0" in err
    other = tmp_path / "copy_of_2x32"
    shutil.copytree(ckpts["2x32"], other)
    (other / "model.json").write_text((ckpts["debug"] / "model.json").read_text())  # same arch, other weights
    err = _refused(capsys, _train(store, tmp_path, f"checkpoint.load={other}", *args))
    assert f"was computed from checkpoint {str(ckpts['debug'])!r}" in err and f"checkpoint.load={str(other)!r}" in err
    _cache(store, ckpts["debug"], shift=5.0)        # a moved copy of the same checkpoint keeps its id
    moved = tmp_path / "moved"
    shutil.copytree(ckpts["debug"], moved)
    assert _train(store, tmp_path, f"checkpoint.load={moved}", *args) == 0


SMALL = [(16, 3, 8, 8)] * 5 + [(16, 3, 8, 8 + 2)] * 2   # the probe: 2 of 7 clips in their own bucket


def test_small_buckets_are_an_error_naming_them_unless_dropped_or_repeated(tmp_path, capsys):
    store = make_store(tmp_path / "pairs.zarr", SMALL, {**ATTRS, "bucket": "auto"})
    batch = ("data.global_batch_pairs=4", "data.micro_batch_pairs=4")
    err = _refused(capsys, _train(store, tmp_path, *batch))
    assert "2 of 7 training pairs are in latent shape buckets smaller than one global batch" in err
    assert "[16, 3, 8, 10]: 2" in err and "data.small_buckets=repeat" in err
    assert _train(store, tmp_path / "drop", *batch, "data.small_buckets=drop") == 0
    assert "warning: " in capsys.readouterr().err
    assert _train(store, tmp_path / "repeat", *batch, "data.small_buckets=repeat", "schedule.train_steps=2") == 0


def test_dry_run_shows_the_checkpoints_architecture(ckpts, capsys):
    from megatron_regdpo.train import main

    assert main(["--config", RECIPE, "--dry-run", "model.size=from_checkpoint",
                 f"checkpoint.load={ckpts['2x32']}"]) == 0
    assert "hidden 64 (2 heads x 32)" in capsys.readouterr().out

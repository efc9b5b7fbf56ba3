"""A folder that is not one of our checkpoints gets a message that says what to do with it."""
from __future__ import annotations

import json

import pytest

from megatron_regdpo.checkpoint_io.megatron_ckpt import read_meta
from megatron_regdpo.models.wan.arch import checkpoint_arch


@pytest.mark.parametrize("read", [read_meta, checkpoint_arch])
def test_diffusers_pipeline_folder_names_the_convert_command(tmp_path, read):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(FileNotFoundError, match=r"diffusers folder: convert it first with "
                                                r"`tools/convert_checkpoint.py import --hf .*transformer --out CKPT`"):
        read(tmp_path)


@pytest.mark.parametrize("read", [read_meta, checkpoint_arch])
def test_run_checkpoints_folder_names_the_newest_checkpoint(tmp_path, read):
    (tmp_path / "latest").write_text("iter_0000040\n")
    with pytest.raises(FileNotFoundError, match=r"holds training checkpoints: use one of them, .*iter_0000040"):
        read(tmp_path)


def test_any_other_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.json not found: .* is not a megatron_regdpo model checkpoint$"):
        read_meta(tmp_path)

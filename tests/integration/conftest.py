"""Fixtures shared by the integration tests: the command-line tools as modules, and a tiny real GT-Pair store."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str):
    """tools/<name>.py as a module (its main() runs in-process)."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def store(tmp_path_factory, pg):
    """Real clips (tiny random VAE/text encoder) and one generated negative each."""
    from megatron_regdpo.data.decode.synth import make_test_clips
    from megatron_regdpo.data.encode import tiny_models

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("store")
    clips, inp = make_test_clips(root / "clips", names=("vp9", "vp8", "mjpeg")), root / "in"
    inp.mkdir()
    for i, path in enumerate(list(clips.values())[:4]):
        if path.stat().st_size > 5000 and path.suffix != ".mp4":
            shutil.copy(path, inp / path.name)
            (inp / path.name).with_suffix(".txt").write_text(f"clip {i}")
    tiny_models(root / "models")
    assert tool("preprocess_videos").main([
        "--input", str(inp), "--store", str(root / "pairs.zarr"), "--frames", "9", "--fps", "8", "--short-side", "64",
        "--bucket", "1:1", "--text-len", "16", "--tiny-random-models", "--models-dir", str(root / "models"),
        "--no-progress"]) == 0
    assert tool("make_gt_pairs").main(["generate", "--store", str(root / "pairs.zarr"), "--random-debug", "-k", "1",
                                       "--steps", "2", "--no-progress"]) == 0
    return root / "pairs.zarr"

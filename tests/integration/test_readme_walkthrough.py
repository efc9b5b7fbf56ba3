"""The README's "From your videos to a tuned pipeline" runs as written: its bash block and its Python block,
taken from README.md, with tiny stand-ins in the variables they read (a random `debug` Wan pipeline saved by
diffusers, synthetic captioned clips, the CPU recipe, one rank)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import av

from megatron_regdpo.data.decode.synth import write_video
from megatron_regdpo.data.encode import load_encoders, tiny_models
from megatron_regdpo.data.negatives import debug_arch_for
from megatron_regdpo.data.store import check_store
from megatron_regdpo.models.wan.pipeline_export import save_random_pipeline
from megatron_regdpo.parallel.procs import run_tree

ROOT = Path(__file__).resolve().parents[2]


def _block(kind: str) -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- walkthrough:{kind} -->\n```{kind}\n(.*?)\n```", text, re.S)
    assert found, f"README.md has no walkthrough:{kind} block"
    return found.group(1)


def test_the_walkthrough_runs_as_written(tmp_path):
    paths = tiny_models(tmp_path / "models")
    attrs = {**load_encoders(paths, "t2v", 16, "cpu").describe(), "task": "t2v"}
    save_random_pipeline(tmp_path / "wan", debug_arch_for(attrs), tmp_path / "models")
    for i in range(3):
        write_video(tmp_path / "videos" / f"clip{i}.webm", "vp9", 96, 64, 40, 24)
        (tmp_path / "videos" / f"clip{i}.txt").write_text(f"a test pattern moving, take {i}")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "WAN": str(tmp_path / "wan"), "VIDEOS": str(tmp_path / "videos"), "OUT": str(tmp_path / "out"),
           "RECIPE": "recipes/debug/tiny_cpu.yaml", "GPUS": "1", "DEVICE": "cpu", "STEPS": "4",
           "SHAPE": "--frames 9 --fps 8 --short-side 64 --bucket 1:1 --text-len 16",
           "TRAIN": "schedule.train_steps=4 checkpoint.interval=4 objective.beta=50",
           "FRAMES": "9", "HEIGHT": "64", "WIDTH": "64"}
    log = tmp_path / "walkthrough.log"
    for kind, cmd in (("bash", ["bash", "-euo", "pipefail", "-c", _block("bash")]),
                      ("python", [sys.executable, "-c", _block("python")])):
        with log.open("a") as out:
            rc = run_tree(cmd, timeout=900, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        assert rc == 0, f"the README's {kind} block failed:\n{log.read_text()[-4000:]}"
    out = tmp_path / "out"
    assert check_store(out / "pairs.zarr").ok and len(list((out / "previews").glob("*.mp4"))) == 3
    assert (out / "tuned" / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "pipeline" / "vae").is_dir()
    with av.open(str(out / "tuned.mp4")) as video:
        stream = video.streams.video[0]
        assert (stream.width, stream.height) == (64, 64) and sum(1 for _ in video.decode(stream)) == 9

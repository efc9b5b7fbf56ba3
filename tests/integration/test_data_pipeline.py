"""The data tools end to end: preprocess -> make_gt_pairs (generate, import) -> check_store; a preprocessing
subprocess killed mid-run and resumed; the decode benchmark's quick mode. Tiny encoders and videos, CPU."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_regdpo.data.decode.synth import make_test_clips, write_video
from megatron_regdpo.data.encode import tiny_models
from megatron_regdpo.data.store import GTPairStore
from megatron_regdpo.experiments.data_ranks import save_debug_checkpoint
from megatron_regdpo.parallel.procs import kill_tree

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preprocess_videos, make_gt_pairs, check_store, bench_decode = (
    _tool(n) for n in ("preprocess_videos", "make_gt_pairs", "check_store", "bench_decode"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    tiny_models(folder)
    return folder


def _args(inp, store, models, frames=9):
    return ["--input", str(inp), "--store", str(store), "--frames", str(frames), "--fps", "8", "--short-side", "64",
            "--bucket", "auto", "--text-len", "32", "--tiny-random-models", "--models-dir", str(models),
            "--no-progress"]


def test_end_to_end_with_bad_files(tmp_path, models, capsys):
    clips = make_test_clips(tmp_path / "clips")
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("vp9", "mjpeg", "h264", "zero", "random", "truncated"):
        if name in clips:
            shutil.copy(clips[name], inp / clips[name].name)
            (inp / clips[name].name).with_suffix(".txt").write_text(f"clip {name}")
    shutil.copy(clips["vp8"], inp / "vp8.webm")                                  # no caption
    store = tmp_path / "pairs.zarr"
    assert preprocess_videos.main(_args(inp, store, models)) == 0
    out = capsys.readouterr().out
    good = sum(n in clips for n in ("vp9", "mjpeg", "h264"))
    assert f"added {good} real clips" in out and "skipped 4: corrupt 1, no_caption 1, truncated 1, zero_length 1" in out
    reasons = sorted(json.loads(line)["reason"] for line in (store / "skipped.jsonl").read_text().splitlines())
    assert reasons == ["corrupt", "no_caption", "truncated", "zero_length"]

    assert make_gt_pairs.main(["generate", "--store", str(store), "--random-debug", "-k", "2", "--steps", "2",
                               "--no-progress"]) == 0
    assert f"generated {2 * good} negatives (debug-random)" in capsys.readouterr().out
    ckpt = save_debug_checkpoint(store, tmp_path / "ckpt")                     # the base model as a checkpoint
    assert make_gt_pairs.main(["generate", "--store", str(store), "--ckpt", str(ckpt), "--generator", "base",
                               "--steps", "2", "--solver", "euler", "--no-progress"]) == 0
    assert f"generated {good} negatives (base)" in capsys.readouterr().out
    negs = tmp_path / "negatives"
    write_video(negs / "otherA" / "vp9.webm", "vp9", 128, 72, 30, 24)
    (negs / "otherB").mkdir()
    (negs / "otherB" / "mjpeg.mp4").write_bytes(b"not a video")
    assert make_gt_pairs.main(["import", "--store", str(store), "--from", str(negs), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "imported 1 negatives {'otherA': 1}" in out and "corrupt 1" in out

    assert check_store.main([str(store)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and f"real: {good}" in out and f"pairs: {3 * good + 1}" in out
    assert "generator otherA: 1 negatives" in out
    assert check_store.main([str(tmp_path / "in")]) == 1                       # not a store: named, exit 1
    assert "not a GT-Pair store" in capsys.readouterr().out
    assert make_gt_pairs.main(["generate", "--store", str(tmp_path), "--random-debug"]) == 2


def test_killed_preprocessing_resumes_to_a_complete_store(tmp_path, models, capsys):
    inp = tmp_path / "in"
    n = 8
    for i in range(n):
        write_video(inp / f"clip{i}.webm", "vp9", 96, 64, 60, 24)
        (inp / f"clip{i}.txt").write_text(f"clip number {i}")
    store = tmp_path / "s.zarr"
    args = _args(inp, store, models, frames=17)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "preprocess_videos.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    log, deadline, committed = store / "commits.jsonl", time.monotonic() + 180, 0
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file():
            committed = sum('"kind": "real"' in line for line in log.read_text().splitlines())
            if committed >= 2:
                break
        time.sleep(0.02)
    assert proc.poll() is None, f"preprocessing ended before it could be killed: {proc.stderr.read()[-2000:]}"
    kill_tree(proc.pid)  # SIGKILL, with anything it started (by pid): nothing of it outlives the test
    proc.wait()
    assert 2 <= committed < n
    # killed: some clips committed, maybe one half-written; the rerun finishes the job
    assert preprocess_videos.main(args) == 0
    assert "store has 8 real clips" in capsys.readouterr().out
    assert check_store.main([str(store)]) == 0, capsys.readouterr().out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    real_ids = [r["id"] for r in records if r["kind"] == "real"]
    assert sorted(real_ids) == sorted(f"clip{i}" for i in range(n))          # every clip exactly once
    assert sorted(p.name for p in (store / "real").iterdir() if p.is_dir()) == sorted(real_ids)
    assert len(GTPairStore(store).records["text"]) == n + 1                   # + the negative prompt


def test_bench_decode_quick(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    assert bench_decode.main(["--quick", "--out", str(out), "--workdir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["backend"] for r in rows if r["kind"] == "decode"} >= {"pyav"}
    assert any(r["kind"] == "vae" for r in rows) and all(r["output_fps"] > 0 for r in rows)
    assert "| decode | pyav | 112x64 |" in table and "decode / encode frames/s" in table

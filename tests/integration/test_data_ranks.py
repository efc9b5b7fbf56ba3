"""The data tools under real torchrun on CPU (gloo): preprocessing, negative generation and the import of other
generators' negatives split over ranks, each clip done exactly once, resumable after the whole job is SIGKILLed,
and the same store as one rank: preprocessing and import at 2 ranks bitwise, negatives at DP2, TP2 and CP2
within 1e-5 (fp32)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_regdpo.data.decode.synth import write_video
from megatron_regdpo.data.encode import tiny_models
from megatron_regdpo.data.store import GTPairStore, check_store
from megatron_regdpo.experiments.data_ranks import save_debug_checkpoint
from megatron_regdpo.parallel.procs import kill_tree

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
TORCHRUN = str(Path(PY).parent / "torchrun")
# one thread per process everywhere (torchrun's default for several workers): same kernels, same bits
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
N_CLIPS = 7


def _cmd(tool: str, args: list[str], ranks: int) -> list[str]:
    script = str(ROOT / "tools" / f"{tool}.py")
    if ranks == 1:
        return [PY, script, *args]
    return [TORCHRUN, "--standalone", f"--nproc-per-node={ranks}", "--no-python", PY, script, *args]


def _run(tool: str, args: list[str], ranks: int = 1, stderr: bool = False):
    out = subprocess.run(_cmd(tool, args, ranks), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{tool} {args} on {ranks} ranks: {out.stdout[-1500:]}\n{out.stderr[-3000:]}"
    return (out.stdout, out.stderr) if stderr else out.stdout


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    inp = root / "in"
    for i in range(N_CLIPS):
        write_video(inp / f"clip{i}.webm", "vp9", 96 + 16 * (i % 2), 64, 40, 24)
        (inp / f"clip{i}.txt").write_text(f"clip number {i % 5}")       # some clips share a caption
    (inp / "broken.webm").write_bytes(b"not a video")
    (inp / "broken.txt").write_text("a broken file")
    tiny_models(root / "models")
    return root


def _pre_args(root: Path, store: Path) -> list[str]:
    return ["--input", str(root / "in"), "--store", str(store), "--frames", "9", "--fps", "8", "--short-side", "64",
            "--bucket", "auto", "--text-len", "16", "--latent-dtype", "fp32", "--tiny-random-models",
            "--models-dir", str(root / "models"), "--no-progress"]


def _arrays(store: GTPairStore, kind: str) -> dict[str, torch.Tensor]:
    if kind == "text":
        return {k: store.read_text(k)[0] for k in store.records["text"]}
    return {k: store.read_latents(kind, k) for k in store.records[kind]}


@pytest.fixture(scope="module")
def one_rank_store(inputs):
    store = inputs / "one.zarr"
    out = _run("preprocess_videos", _pre_args(inputs, store))
    assert f"added {N_CLIPS} real clips" in out and "skipped 1: corrupt 1" in out
    return store


def _kill_after(cmd: list[str], store: Path, kind: str, n: int) -> int:
    """Start the job, SIGKILL all of it (torchrun and its workers, by pid) once `n` samples of `kind` are
    committed; returns how many were."""
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline, committed = store / "commits.jsonl", time.monotonic() + 240, 0
    try:
        while time.monotonic() < deadline and proc.poll() is None and committed < n:
            committed = log.read_text().count(f'"kind": "{kind}"') if log.is_file() else 0
            time.sleep(0.01)
        assert proc.poll() is None, "the job ended before it could be killed"
    finally:
        kill_tree(proc.pid)
        proc.wait()
    return log.read_text().count(f'"kind": "{kind}"')


def test_preprocessing_on_two_ranks_is_exactly_once_resumable_and_equal_to_one_rank(inputs, one_rank_store):
    store = inputs / "two.zarr"
    committed = _kill_after(_cmd("preprocess_videos", _pre_args(inputs, store), 2), store, "real", 2)
    assert 2 <= committed < N_CLIPS
    out = _run("preprocess_videos", _pre_args(inputs, store), ranks=2)   # the rerun finishes the job
    assert "on 2 ranks" in out and f"store has {N_CLIPS} real clips" in out and "skipped 1: corrupt 1" in out
    assert out.count("added") == 1                                       # one summary line, from rank 0
    assert check_store(store).ok, check_store(store).problems
    records = [json.loads(line) for line in (store / "commits.jsonl").read_text().splitlines()]
    ids = [(r["kind"], r["id"]) for r in records]
    assert len(ids) == len(set(ids)) == N_CLIPS + 5 + 1   # clips, their captions, the negative prompt
    report = [json.loads(line) for line in (store / "skipped.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in report] == ["corrupt"] and report[0]["file"].endswith("broken.webm")
    one, two = GTPairStore(one_rank_store), GTPairStore(store)
    for kind in ("text", "real"):
        a, b = _arrays(one, kind), _arrays(two, kind)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind


def test_negatives_on_two_ranks_at_dp_tp_and_cp_resumable_and_equal_to_one_rank(inputs, one_rank_store, tmp_path):
    ckpt = save_debug_checkpoint(one_rank_store, tmp_path / "base")   # a random debug Wan, in a process of its own
    stores = {}
    for name in ("one", "dp2", "tp2"):
        stores[name] = tmp_path / f"{name}.zarr"
        shutil.copytree(one_rank_store, stores[name])
    gen = ["generate", "--ckpt", str(ckpt), "--steps", "20", "--no-progress"]  # ~0.3 s a clip: time to kill
    out = _run("make_gt_pairs", [*gen, "--store", str(stores["one"]), "-k", "2"])
    assert f"generated {2 * N_CLIPS} negatives (base)" in out
    dp2 = [*gen[:-1], "--store", str(stores["dp2"]), "-k", "2"]
    made = _kill_after(_cmd("make_gt_pairs", dp2, 2), stores["dp2"], "generated", 2)   # killed mid-run ...
    assert 2 <= made < 2 * N_CLIPS
    out, err = _run("make_gt_pairs", dp2, ranks=2, stderr=True)                        # ... and resumed
    assert f"generated {2 * N_CLIPS - made} negatives (base)" in out and f"{made} already there" in out
    assert "on 2 model replicas x 1 ranks" in out
    left = N_CLIPS - made // 2  # clips with a negative to make (a clip's K negatives commit in one round)
    assert err.count(f"| 0/{left} [") == 1 and f"{left}/{left} [" in err  # one bar for the job, on rank 0
    out = _run("make_gt_pairs", [*gen, "--store", str(stores["tp2"]), "-k", "1", "--tp", "2"], ranks=2)
    assert f"generated {N_CLIPS} negatives" in out and "on 1 model replicas x 2 ranks" in out
    out = _run("make_gt_pairs", [*gen, "--store", str(stores["tp2"]), "-k", "2", "--cp", "2"], ranks=2)
    assert f"generated {N_CLIPS} negatives" in out and f"{N_CLIPS} already there" in out   # resumed: k=1 only
    reference = _arrays(GTPairStore(stores["one"]), "generated")
    assert len(reference) == 2 * N_CLIPS
    for name in ("dp2", "tp2"):  # tp2: k=0 made at TP2, k=1 at CP2
        assert check_store(stores[name]).ok
        got = _arrays(GTPairStore(stores[name]), "generated")
        assert got.keys() == reference.keys()
        for key, ref in reference.items():
            err = ((got[key] - ref).norm() / ref.norm()).item()
            assert err <= 1e-5, (name, key, err)
        records = [json.loads(line) for line in (stores[name] / "commits.jsonl").read_text().splitlines()]
        assert sum(r["kind"] == "generated" for r in records) == 2 * N_CLIPS  # each negative committed once


def _negatives_folder(root: Path) -> Path:
    """Three other generators' videos for the store's clips (20 good ones: enough rounds to kill the job in
    between), with one broken file, one for no real clip and one naming a negative twice (another container)."""
    negs = root / "negatives"
    for g, generator in enumerate(("otherA", "otherB", "otherC")):
        for i in range(N_CLIPS):
            write_video(negs / generator / f"clip{i}.webm", "vp9", 80 + 16 * ((i + g) % 3), 48, 30, 24)
    write_video(negs / "otherA" / "clip1.mkv", "vp9", 80, 48, 30, 24)       # a second otherA clip1
    write_video(negs / "otherB" / "nosuchclip.webm", "vp9", 80, 48, 30, 24)
    (negs / "otherB" / "clip4.webm").write_bytes(b"not a video")           # a broken one for a real clip
    return negs


def test_import_on_two_ranks_is_exactly_once_resumable_and_equal_to_one_rank(inputs, one_rank_store, tmp_path):
    negs = _negatives_folder(tmp_path)
    stores = {name: tmp_path / f"{name}.zarr" for name in ("one", "two")}
    for store in stores.values():
        shutil.copytree(one_rank_store, store)
    args = lambda store: ["import", "--store", str(store), "--from", str(negs), "--no-progress"]  # noqa: E731
    skipped = "skipped 3: corrupt 1, duplicate_negative 1, no_real_clip 1"
    out = _run("make_gt_pairs", args(stores["one"]))
    assert "imported 20 negatives {'otherA': 7, 'otherB': 6, 'otherC': 7}" in out and skipped in out, out
    made = _kill_after(_cmd("make_gt_pairs", args(stores["two"]), 2), stores["two"], "generated", 2)  # killed ...
    assert 2 <= made < 20
    out = _run("make_gt_pairs", args(stores["two"]), ranks=2)                                        # ... resumed
    assert f"imported {20 - made} negatives" in out and f"{made} already there" in out and "on 2 ranks" in out
    assert skipped in out and out.count("imported") == 1
    reasons = sorted(json.loads(line)["reason"] for line in (stores["two"] / "skipped_negatives.jsonl").open())
    assert reasons == ["corrupt", "duplicate_negative", "no_real_clip"]   # every rank's skips, written once
    one, two = GTPairStore(stores["one"]), GTPairStore(stores["two"])
    a, b = _arrays(one, "generated"), _arrays(two, "generated")
    assert len(a) == 20 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert check_store(stores["two"]).ok
    records = [json.loads(line) for line in (stores["two"] / "commits.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "generated" for r in records) == 20   # each negative committed once
    assert one.records["generated"] == two.records["generated"]
    # a file added for a negative already imported is the duplicate, whatever their names' order
    write_video(negs / "otherC" / "clip0.avi", "vp9", 80, 48, 30, 24)
    out = _run("make_gt_pairs", args(stores["one"]))
    assert "imported 0 negatives" in out and "20 already there" in out and "duplicate_negative 2" in out, out
    report = [json.loads(line) for line in (stores["one"] / "skipped_negatives.jsonl").open()]
    (late,) = [r for r in report if r["file"].endswith("clip0.avi")]
    assert late["reason"] == "duplicate_negative" and "clip0.webm" in late["detail"] and "already" in late["detail"]


def test_a_bad_layout_is_one_error_line(inputs, one_rank_store):
    out = subprocess.run(_cmd("make_gt_pairs", ["generate", "--store", str(one_rank_store), "--random-debug",
                                                "--tp", "3", "--no-progress"], 2),
                         env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --tp 3 x --cp 1 must divide the 2 ranks of this job"], out.stderr[-2000:]

"""What more ranks buy the data tools: preprocessing (decode + tiny VAE + text encoder) and negative generation
(the debug Wan, CFG, UniPC) run as real jobs, one rank vs torchrun with several, on the same inputs, in one run.

Each configuration is a fresh store made by the real tool (tools/preprocess_videos.py,
tools/make_gt_pairs.py generate) in its own process tree; the figures are the tools' own summary seconds
(the work after start-up: encoders/model loaded, store opened, every clip done and committed) and the wall
time of the whole command (Python, torch and megatron-core imports, rendezvous included).
Rows: ranks x threads per rank, so that one rank with every core is compared with ranks that split them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = {"preprocess": re.compile(r"added (\d+) real clips in ([\d.]+) s"),
           "generate": re.compile(r"generated (\d+) negatives \(\S+\) in ([\d.]+) s")}


def make_inputs(folder: Path, clips: int) -> Path:
    from megatron_regdpo.data.decode.synth import write_video
    from megatron_regdpo.data.encode import tiny_models

    inp = folder / "in"
    for i in range(clips):
        write_video(inp / f"clip{i:03d}.webm", "vp9", 160, 96, 60, 24)  # 2.5 s: 17 frames at 8 fps
        (inp / f"clip{i:03d}.txt").write_text(f"a synthetic clip, number {i}")
    tiny_models(folder / "models")
    return inp


def _command(tool: str, args: list[str], ranks: int) -> list[str]:
    script = str(ROOT / "tools" / f"{tool}.py")
    if ranks == 1:
        return [sys.executable, script, *args]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return [torchrun, "--standalone", f"--nproc-per-node={ranks}", "--no-python", sys.executable, script, *args]


def run_tool(kind: str, tool: str, args: list[str], ranks: int, threads: int) -> dict:
    from megatron_regdpo.parallel.procs import run_tree

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    log = Path(args[args.index("--store") + 1] + ".log")
    start = time.monotonic()
    with log.open("w") as out:
        rc = run_tree(_command(tool, args, ranks), env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                      timeout=1800)
    wall = time.monotonic() - start
    text = log.read_text()
    found = SUMMARY[kind].search(text)
    if rc or not found or not int(found.group(1)):
        raise RuntimeError(f"{kind} on {ranks} ranks failed (exit {rc}); see {log}:\n{text[-2000:]}")
    clips, seconds = int(found.group(1)), float(found.group(2))
    return {"kind": kind, "ranks": ranks, "threads_per_rank": threads, "clips": clips, "seconds": seconds,
            "clips_per_s": round(clips / seconds, 3), "wall_s": round(wall, 2)}


def run(workdir: Path, out: Path, clips: int, steps: int, layouts: list[tuple[int, int]]) -> list[dict]:
    """layouts: (ranks, threads per rank); the first is the baseline of the ratios."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    inp = make_inputs(workdir, clips)
    pre = ["--input", str(inp), "--frames", "17", "--fps", "8", "--short-side", "96", "--bucket", "16:9",
           "--text-len", "32", "--tiny-random-models", "--models-dir", str(workdir / "models"), "--no-progress"]
    rows = []
    for ranks, threads in layouts:
        store = workdir / f"pre_{ranks}x{threads}.zarr"
        rows.append(run_tool("preprocess", "preprocess_videos", [*pre, "--store", str(store)], ranks, threads))
    base_store = workdir / f"pre_{layouts[0][0]}x{layouts[0][1]}.zarr"
    ckpt = save_debug_checkpoint(base_store, workdir / "base")
    for ranks, threads in layouts:
        store = workdir / f"gen_{ranks}x{threads}.zarr"
        shutil.copytree(base_store, store)
        gen = ["generate", "--store", str(store), "--ckpt", str(ckpt), "--steps", str(steps), "--no-progress"]
        rows.append(run_tool("generate", "make_gt_pairs", gen, ranks, threads))
    for kind in ("preprocess", "generate"):
        mine = [r for r in rows if r["kind"] == kind]
        for r in mine:
            r["ratio_vs_first"] = round(r["clips_per_s"] / mine[0]["clips_per_s"], 3)
    with out.open("a") as f:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        for r in rows:
            f.write(json.dumps({"bench": "data_ranks", "time": stamp, "cpus": os.cpu_count(), **r}) + "\n")
    return rows


def save_debug_checkpoint(store: Path, folder: Path) -> Path:
    """A random `debug` Wan that fits the store, saved as a Megatron checkpoint (in a process of its own)."""
    from megatron_regdpo.parallel.procs import run_tree

    code = ("import dataclasses, sys, torch\n"
            "from megatron_regdpo.checkpoint_io.megatron_ckpt import save_model\n"
            "from megatron_regdpo.data.negatives import debug_arch_for\n"
            "from megatron_regdpo.data.store import GTPairStore\n"
            "from megatron_regdpo.models.wan.build import build_wan\n"
            "from megatron_regdpo.models.wan.convert import FAMILY\n"
            "from megatron_regdpo.parallel.groups import distributed_session\n"
            "arch = debug_arch_for(GTPairStore(sys.argv[1]).attrs)\n"
            "with distributed_session() as pg:\n"
            "    torch.manual_seed(1)\n"
            "    save_model(build_wan(arch, pg), sys.argv[2], {'family': FAMILY, 'arch': dataclasses.asdict(arch),"
            " 'dtype': str(torch.float32)})\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    if run_tree([sys.executable, "-c", code, str(store), str(folder)], timeout=600, env=env, cwd=ROOT):
        raise RuntimeError(f"could not save the debug base model to {folder}")
    return folder


def table(rows: list[dict]) -> str:
    lines = ["| step | ranks x threads | clips | seconds | clips/s | vs first row | wall s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['ranks']} x {r['threads_per_rank']} | {r['clips']} | {r['seconds']:.2f} | "
              f"{r['clips_per_s']:.2f} | {r['ratio_vs_first']:.2f}x | {r['wall_s']:.1f} |" for r in rows]
    return "\n".join(lines)

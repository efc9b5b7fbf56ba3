"""Decode + normalise throughput per backend (PyAV, DALI-CPU, NVDEC when a GPU is present) on the same VP9
files, against the VAE-encode throughput of the same run (goal: decoding at least 5x faster than encoding).

Everything is generated here: VP9 sources at 24 fps, normalised as preprocessing does (16 fps, 4k+1 frames,
cover-resize + center-crop to the target bucket). Rates are output frames per second (frames of the
normalised clip), plus source frames decoded per second. Best of `repeats` runs.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from megatron_regdpo.data.decode import DecodeOptions, VideoDecoder
from megatron_regdpo.data.decode.dali_backend import dali_available, nvdec_available
from megatron_regdpo.data.decode.synth import write_video

SOURCES = {"480p": (832, 480), "720p": (1280, 720)}  # name -> (width, height)


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_decoders(workdir: Path, sources: dict, frames: int, fps: float, short_side: int, repeats: int) -> list[dict]:
    backends = ["pyav"] + (["dali-cpu"] if dali_available() else []) + (["dali-nvdec"] if nvdec_available() else [])
    records = []
    for name, (w, h) in sources.items():
        src_frames = int((frames - 1) / fps * 24) + 2
        path = write_video(workdir / f"bench_{name}.webm", "vp9", w, h, src_frames, 24)
        for backend in backends:
            device = "cuda" if backend == "dali-nvdec" else "cpu"
            opts = DecodeOptions(fps=fps, frames=frames, short_side=short_side, bucket="16:9", device=device,
                                 prefer={"*": (backend,)})
            decoder = VideoDecoder(opts)
            decoder.load(path)  # warm-up: pipeline build, codec init
            clip_holder = {}

            def run():
                clip_holder["clip"] = decoder.load(path)
                if device == "cuda":
                    torch.cuda.synchronize()
            sec = _best_time(run, repeats)
            clip = clip_holder["clip"]
            decoded = max(clip.frame_indices) + 1
            records.append({"kind": "decode", "backend": backend, "codec": "vp9", "source": f"{w}x{h}",
                            "target": "x".join(map(str, clip.video_CTHW.shape[-2:][::-1])), "out_frames": frames,
                            "decoded_frames": decoded, "seconds": round(sec, 4),
                            "output_fps": round(frames / sec, 1), "decoded_fps": round(decoded / sec, 1)})
    return records


def bench_vae(label: str, vae, frames: int, height: int, width: int, repeats: int) -> dict:
    from megatron_regdpo.data.encode import WanVAE

    enc = WanVAE(vae)
    video_BCTHW = torch.rand(1, 3, frames, height, width) * 2 - 1
    sec = _best_time(lambda: enc.encode(video_BCTHW), repeats)
    return {"kind": "vae", "backend": label, "source": f"{width}x{height}", "out_frames": frames,
            "seconds": round(sec, 3), "output_fps": round(frames / sec, 2)}


def run_bench(workdir: str | Path, out_jsonl: str | Path | None = None, sources: dict | None = None,
              frames: int = 81, fps: float = 16, short_side: int = 480, repeats: int = 2,
              tiny_vae_frames: int = 17, real_vae_frames: int = 0) -> list[dict]:
    """Decoder rows for each source, a tiny-VAE row and (real_vae_frames > 0) a Wan2.1-VAE-architecture row."""
    from diffusers import AutoencoderKLWan

    from megatron_regdpo.data.encode.tiny import TINY_VAE

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    records = bench_decoders(workdir, sources or SOURCES, frames, fps, short_side, repeats)
    h, w = (short_side, round(short_side * 16 / 9 / 16) * 16) if short_side != 480 else (480, 832)
    records.append(bench_vae("tiny random AutoencoderKLWan", AutoencoderKLWan(**TINY_VAE), tiny_vae_frames, h, w,
                             repeats))
    if real_vae_frames:
        records.append(bench_vae("Wan2.1 VAE architecture (random weights)", AutoencoderKLWan(), real_vae_frames,
                                 h, w, 1))
    machine = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
               "date": time.strftime("%Y-%m-%d")}
    records = [{**r, **machine} for r in records]
    if out_jsonl:
        Path(out_jsonl).parent.mkdir(parents=True, exist_ok=True)
        with Path(out_jsonl).open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def markdown_table(records: list[dict]) -> str:
    lines = ["| what | backend | source | output | frames | s | output frames/s | decoded frames/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['kind']} | {r['backend']} | {r['source']} | {r.get('target', 'latents')} | "
                     f"{r['out_frames']} | {r['seconds']} | {r['output_fps']} | {r.get('decoded_fps', '')} |")
    vaes = [r for r in records if r["kind"] == "vae"]
    if vaes:
        lines += ["", "| decode backend | source | VAE | decode / encode frames/s |", "|---|---|---|---|"]
        for dec in (r for r in records if r["kind"] == "decode"):
            lines += [f"| {dec['backend']} | {dec['source']} | {vae['backend']} | "
                      f"{dec['output_fps'] / vae['output_fps']:.1f}x |" for vae in vaes]
    return "\n".join(lines)

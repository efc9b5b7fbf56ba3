"""`make demo`: the whole product on an embedded default, on a CPU machine, in a few minutes.

1. make a few small clips (VP9 and H.264) with captions;
2. preprocess them on 2 ranks (torchrun; the clips split between them): decode (DALI or PyAV per codec),
   tiny random Wan-architecture VAE and UMT5 text encoder (no downloads), zarr GT-Pair store;
3. a base model as users have it, a Wan diffusers pipeline folder (a random `debug` DiT with the tiny encoders),
   imported as a Megatron checkpoint; it generates the negatives with the pipeline's scheduler;
   side-by-side preview mp4s of the pairs (winner left, loser right) in runs/demo/previews/;
4. Reg-DPO for 20 steps on 2 gloo ranks with tensor parallelism (torchrun, recipes/debug/tiny_cpu_tp2.yaml),
   LoRA on the base weights, the reference being the base with its adapters off, with checkpoints; every 10
   steps validation videos of 2 held-out clips (real | reference | policy) in runs/demo/train/eval_videos/;
5. export the last checkpoint as a whole diffusers pipeline (our transformer, LoRA merged and verified
   against the checkpoint, with the base pipeline's VAE, text encoder, tokenizer and scheduler) and the
   adapter alone in PEFT format; load the pipeline with diffusers and sample from it; plot the run.
Everything lands in runs/demo/ (replaced on each run).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

from megatron_regdpo.parallel.procs import run_tree

ROOT = Path(__file__).resolve().parents[1]
CLIPS = [("vp9", "webm", 96, 64, 40, 24), ("vp9", "webm", 128, 96, 36, 30), ("h264", "mp4", 80, 64, 40, 30),
         ("h264", "mp4", 96, 96, 32, 25), ("vp9", "webm", 64, 96, 30, 20), ("h264", "mp4", 112, 80, 40, 24)]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stage(n: int, text: str) -> None:
    print(f"\n== [{n}/5] {text}", flush=True)


def make_clips(folder: Path) -> int:
    from megatron_regdpo.data.decode.synth import encoder_for, write_video

    folder.mkdir(parents=True)
    made = 0
    for i, (codec, ext, w, h, frames, fps) in enumerate(CLIPS):
        if encoder_for(codec) is None:
            print(f"  (this PyAV has no {codec} encoder: skipping clip {i})")
            continue
        path = write_video(folder / f"clip{i}_{codec}.{ext}", codec, w, h, frames, fps)
        path.with_suffix(".txt").write_text(f"a synthetic test pattern, clip {i}, moving {'left' if i % 2 else 'right'}")
        made += 1
    return made


def save_base_pipeline(folder: Path, store: Path, models: Path, seed: int) -> None:
    """The base model as users have it: a Wan diffusers pipeline folder (a random `debug`-sized transformer
    with the store's tiny VAE and text encoder, saved by diffusers itself)."""
    from megatron_regdpo.data.negatives import debug_arch_for
    from megatron_regdpo.data.store import GTPairStore
    from megatron_regdpo.models.wan.pipeline_export import save_random_pipeline

    save_random_pipeline(folder, debug_arch_for(GTPairStore(store).attrs), models, seed=seed)


def sample_exported_pipeline(folder: Path, store: Path) -> str:
    """Load the exported pipeline with diffusers and sample 2 steps from a stored caption's embedding."""
    import diffusers
    import torch

    from megatron_regdpo.data.store import GTPairStore

    pairs = GTPairStore(store)
    attrs, pid = pairs.attrs, next(iter(pairs.records["real"].values()))["prompt_id"]
    text_TE, neg_TE = pairs.read_text(pid)[0].float(), pairs.read_text(attrs["negative_prompt_id"])[0].float()
    pipe = diffusers.WanPipeline.from_pretrained(str(folder))
    latents = pipe(prompt_embeds=text_TE[None], negative_prompt_embeds=neg_TE[None], height=64, width=64,
                   num_frames=attrs["frames"], num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).frames
    return f"diffusers loaded {folder} ({type(pipe).__name__}) and sampled 2 steps: latents {list(latents.shape)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from megatron_regdpo.training.startup import hide_known_warnings

    hide_known_warnings()  # before this process imports megatron-core (the base model of stage 3)
    out, t0 = Path(args.out), time.time()
    shutil.rmtree(out, ignore_errors=True)
    store, models = out / "pairs.zarr", out / "models"

    _stage(1, "clips")
    print(f"  {make_clips(out / 'clips')} clips in {out / 'clips'}")
    _stage(2, f"preprocess on {args.ranks} ranks (torchrun): decode, tiny VAE + text encoder, zarr store")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if run_tree([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
                 str(ROOT / "tools" / "preprocess_videos.py"), "--input", str(out / "clips"), "--store", str(store),
                 "--frames", "9", "--fps", "8", "--short-side", "64", "--bucket", "1:1", "--text-len", "16",
                 "--tiny-random-models", "--models-dir", str(models)], env=env):
        return 1
    _stage(3, "base model (a diffusers Wan pipeline folder, imported) and its negatives")
    save_base_pipeline(out / "base_pipeline", store, models, seed=1234)
    rc = _tool("convert_checkpoint").main(["import", "--hf", str(out / "base_pipeline" / "transformer"),
                                           "--out", str(out / "base")])
    if rc:
        return rc
    rc = _tool("make_gt_pairs").main(["generate", "--store", str(store), "--ckpt", str(out / "base"), "-k", "1",
                                      "--steps", "4", "--scheduler", str(out / "base_pipeline")])
    if rc:
        return rc
    rc = _tool("make_gt_pairs").main(["preview", "--store", str(store), "--out", str(out / "previews"), "--n", "4"])
    if rc:
        return rc
    _stage(4, f"Reg-DPO, {args.steps} steps on {args.ranks} gloo ranks (torchrun, TP{args.ranks})")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
           "-m", "megatron_regdpo.train", "--config", str(ROOT / "recipes/debug/tiny_cpu_tp2.yaml"),
           f"parallel.tp={args.ranks}", f"data.store={store}", f"checkpoint.load={out / 'base'}",
           f"run.output_dir={out}", "run.name=train", f"schedule.train_steps={args.steps}", "checkpoint.interval=10",
           "objective.beta=50", "logging.interval=5",
           # LoRA as in the paper (rank 16 / alpha 32 at full size), reference = the base with adapters off
           "lora.rank=4", "lora.alpha=8", "objective.reference.mode=lora_base", "optim.lr=1e-3",
           # every 10 steps: held-out accuracy and validation videos (real | reference | policy) of 2 held-out clips
           "eval.holdout_pairs=2", "eval.interval=10", "eval.videos.count=2", "eval.videos.steps=8"]
    if run_tree(cmd, env=env):  # interrupted: torchrun's ranks end too
        return 1
    _stage(5, "export a diffusers pipeline, load it, plot")
    latest = out / "train" / "checkpoints" / (out / "train" / "checkpoints" / "latest").read_text().strip()
    rc = _tool("convert_checkpoint").main(["export", "--ckpt", str(latest), "--out", str(out / "pipeline"),
                                           "--pipeline-from", str(out / "base_pipeline"), "--verify",
                                           "--adapter-out", str(out / "lora_adapter")])
    if rc:
        return rc
    print(sample_exported_pipeline(out / "pipeline", store))
    rc = _tool("plot_run").main([str(out / "train")])
    print(f"\ndemo done in {time.time() - t0:.0f} s: store {store}, run {out / 'train'} "
          f"(metrics.jsonl, dashboard.png, checkpoints/, eval_videos/), pair previews {out / 'previews'}, "
          f"diffusers pipeline {out / 'pipeline'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())

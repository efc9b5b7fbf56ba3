"""What a training step waits for its pairs, and how much of it data.prefetch hides, at a real clip's size.

A GT-Pair store of synthetic pairs at the latent size of a real clip (default: Wan2.1 I2V at 720x1280, 81
frames: latents [16, 21, 90, 160], the I2V conditioning [20, 21, 90, 160] and CLIP tokens [257, 1280], UMT5
text [512, 4096]; bf16 as the store keeps them, random values, which compress about as badly as real
latents) is read through the trainer's own PairDataset and Prefetcher:
- read_s: one pair read on the main thread, the trainer's wait without prefetching;
- compute_s: a stand-in for the step, sized to take about `compute_factor` x read_s: `step="cpu"`, float32
  matmuls on the main thread (a CPU run: the reader competes with the step for this machine's cores), or
  `step="wait"`, the main thread blocked without holding the GIL (a GPU run, where the trainer's thread mostly
  waits for the device);
- overlapped_s: the same compute while the Prefetcher reads the pair in its thread, then the item taken;
  waited_s: the time from the compute's end until the item was there (the trainer's wait with prefetching).
hidden = 1 - waited_s / read_s: the share of the read the thread took off the step. Medians of `repeats`,
each on a pair not read before in this process. The store was just written, so the OS page cache serves its
files: read_s is zarr's decompression and the tensors' assembly, a lower bound on a shared file system.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch

from megatron_regdpo.data.pairs import PairDataset
from megatron_regdpo.data.prefetch import Prefetcher
from megatron_regdpo.data.store import GTPairStore, prompt_id

I2V_720P_81 = {"latents": (16, 21, 90, 160), "cond": (20, 21, 90, 160), "image": (257, 1280), "text": (512, 4096)}


def make_store(path: Path, pairs: int, shapes: dict = I2V_720P_81, seed: int = 0) -> PairDataset:
    """`pairs` synthetic I2V pairs (one real clip, one negative each) at `shapes`, in a new store at `path`."""
    if Path(path).exists():
        raise ValueError(f"{path} exists: the benchmark writes a new store (name another --workdir)")
    z, text_dim = shapes["latents"][0], shapes["text"][1]
    attrs = {"task": "i2v", "fps": 16, "frames": 4 * (shapes["latents"][1] - 1) + 1, "short_side": 720,
             "bucket": "16:9", "latent_dtype": "bf16", "text_len": shapes["text"][0],
             "vae": {"z_dim": z, "latents_mean": [0.0] * z, "latents_std": [1.0] * z},
             "text_encoder": {"dim": text_dim}, "negative_prompt_id": prompt_id("")}
    store = GTPairStore.open_or_create(path, attrs)
    g = torch.Generator().manual_seed(seed)
    rand = lambda shape: torch.randn(shape, generator=g)  # noqa: E731
    store.write_text(prompt_id(""), rand(shapes["text"]), torch.arange(shapes["text"][0]) < 1, "")
    for n in range(pairs):
        sid, pid = f"clip{n:04d}", prompt_id(f"caption {n}")
        store.write_text(pid, rand(shapes["text"]), torch.arange(shapes["text"][0]) < 40, f"caption {n}")
        store.write_real(sid, rand(shapes["latents"]), {"prompt_id": pid, "size": [720, 1280]},
                         image_IE=rand(shapes["image"]), cond_CFhw=rand(shapes["cond"]))
        store.write_generated(f"{sid}.neg.0", rand(shapes["latents"]), {"real_id": sid, "generator": "neg", "k": 0})
    store.finalize()
    return PairDataset(path)


def _stand_in(step: str, seconds: float, size: int = 512):
    """A function that takes about `seconds`: matmuls (step="cpu") or a blocked wait (step="wait")."""
    if step == "wait":
        return lambda: time.sleep(seconds)
    if step != "cpu":
        raise ValueError(f"step={step!r}: 'cpu' or 'wait'")
    a = torch.randn(size, size) / size ** 0.5

    def compute(reps: int) -> None:
        x = a
        for _ in range(reps):
            x = torch.tanh(x @ x)
    t0 = time.perf_counter()
    compute(4)
    reps = max(1, round(seconds / ((time.perf_counter() - t0) / 4)))
    return lambda: compute(reps)


def measure(dataset: PairDataset, repeats: int, compute_factor: float = 2.0, step: str = "cpu") -> dict:
    """read_s, compute_s, overlapped_s, waited_s (medians) and hidden: pairs 0 .. repeats - 1 read on this
    thread, pairs repeats .. 2 * repeats - 1 read ahead."""
    assert len(dataset) >= 2 * repeats, f"the store needs {2 * repeats} pairs, it has {len(dataset)}"
    reads = []
    for i in range(repeats):
        t0 = time.perf_counter()
        dataset[i]
        reads.append(time.perf_counter() - t0)
    read_s = statistics.median(reads)
    run_step = _stand_in(step, compute_factor * read_s)
    computes, overlapped, waited = [], [], []
    prefetcher = Prefetcher(dataset)
    try:
        for i in range(repeats, 2 * repeats):
            t0 = time.perf_counter()
            run_step()
            computes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            prefetcher.prefetch([i])
            run_step()
            t1 = time.perf_counter()
            prefetcher[i]
            t2 = time.perf_counter()
            overlapped.append(t2 - t0)
            waited.append(t2 - t1)
    finally:
        prefetcher.close()
    waited_s = statistics.median(waited)
    pair_bytes = sum(v.numel() * v.element_size() for v in dataset[0].values() if torch.is_tensor(v))
    return {"read_s": read_s, "compute_s": statistics.median(computes), "overlapped_s": statistics.median(overlapped),
            "waited_s": waited_s, "hidden": 1.0 - waited_s / read_s, "pair_mib": pair_bytes / 2**20,
            "step": step, "repeats": repeats, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "node": platform.node(), "torch": torch.__version__}


def summarize(record: dict) -> str:
    return (f"one pair ({record['pair_mib']:.0f} MiB in memory): read {record['read_s'] * 1e3:.0f} ms on the "
            f"step's thread; with the read ahead during a {record['compute_s'] * 1e3:.0f} ms step "
            f"({record['step']}) it waited "
            f"{record['waited_s'] * 1e3:.1f} ms ({record['hidden']:.0%} hidden; the step plus the overlapped read "
            f"took {record['overlapped_s'] * 1e3:.0f} ms)")

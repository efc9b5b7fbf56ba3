"""Offline reference errors: run the base model over every (pair, draw) once, for the `cached` mode.

Legend: C/F/H/W latent channels, frames, height, width; T text tokens, E embedding width, I image tokens.

Inputs are `PairLatents`, one per GT pair, from any source (the pair store's reader, or a bundle file of
stacked tensors, `read_pair_bundle`). The batches are built exactly as in training: make_pair_batch with the
keyed (seed, step, pair_id, draw), winner and loser stacked, so the errors equal the online reference ones.
Data-parallel ranks take pairs round-robin and the results are gathered on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_regdpo.objectives.flow_matching import FlowMatchingSettings, make_pair_batch, stack_pair

from .base import ReferenceBatch, ReferenceErrors


@dataclass
class PairLatents:
    pair_id: int
    x0_w: torch.Tensor                 # [C, F, H, W] winner (real clip) latents
    x0_l: torch.Tensor                 # [C, F, H, W] loser (generated) latents
    text: torch.Tensor                 # [T, E] prompt embedding
    image: torch.Tensor | None = None  # [I, E] CLIP tokens of the first frame (I2V)
    cond: torch.Tensor | None = None   # [C_cond, F, H, W] first-frame conditioning channels (I2V)


def reference_batch(pairs: Sequence[PairLatents], *, seed: int, step: int, draw: int,
                    settings: FlowMatchingSettings, device="cpu", dtype: torch.dtype = torch.float32) -> ReferenceBatch:
    """The micro-batch of `pairs` as the trainer builds it (training/batches.py): noise, timestep and target
    in float32 from float32 latents, then the model inputs (x_t, text, image) cast to the model's dtype."""
    def stack(name):
        return torch.stack([getattr(p, name) for p in pairs]).to(device=device, dtype=torch.float32)

    fm = make_pair_batch(stack("x0_w"), stack("x0_l"), [p.pair_id for p in pairs], seed=seed, step=step,
                         settings=settings, draw=draw)
    x_t = fm.x_t_BCFHW
    if pairs[0].cond is not None:
        cond = stack("cond")
        x_t = torch.cat([x_t, stack_pair(cond, cond)], dim=1)
    text = stack("text")
    image = stack("image") if pairs[0].image is not None else None
    return ReferenceBatch(x_t=x_t.to(dtype), timestep=fm.timestep_B.to(device), text=stack_pair(text, text).to(dtype),
                          target=fm.target_BCFHW, image=None if image is None else stack_pair(image, image).to(dtype),
                          pair_ids=tuple(p.pair_id for p in pairs), seed=seed, step=step, draw=draw)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def precompute_reference_errors(reference: ReferenceErrors, pairs: Iterable[PairLatents], *, seed: int, step: int,
                                draws: Sequence[int], settings: FlowMatchingSettings, pairs_per_batch: int = 1,
                                device="cpu", dtype: torch.dtype = torch.float32, dp_group=None) -> dict:
    """{pair_id, draw, err_w, err_l} lists over all pairs and draws (every DP rank's share, gathered)."""
    dp_size = 1 if dp_group is None else dist.get_world_size(dp_group)
    dp_rank = 0 if dp_group is None else dist.get_rank(dp_group)
    mine = [p for i, p in enumerate(pairs) if i % dp_size == dp_rank]
    rows, err_dtype = [], None
    reference.begin_step()
    try:
        for draw in draws:
            for chunk in _chunks(mine, pairs_per_batch):
                batch = reference_batch(chunk, seed=seed, step=step, draw=draw, settings=settings, device=device,
                                        dtype=dtype)
                w, l = reference(batch)
                rows += [(p.pair_id, draw, float(a), float(b)) for p, a, b in zip(chunk, w.tolist(), l.tolist())]
                err_dtype = w.dtype
    finally:
        reference.end_step()
    if dp_size > 1:
        parts = [None] * dp_size
        dist.all_gather_object(parts, rows, group=dp_group)
        rows = [r for part in parts for r in part]
    rows.sort(key=lambda r: (r[1], r[0]))
    return {"pair_id": [r[0] for r in rows], "draw": [r[1] for r in rows], "err_w": [r[2] for r in rows],
            "err_l": [r[3] for r in rows], "err_dtype": err_dtype or torch.float32}


def read_pair_bundle(path: str | Path) -> list[PairLatents]:
    """A torch-saved dict of stacked tensors: pair_id [N], x0_w/x0_l [N, C, F, H, W], text [N, T, E],
    optional image [N, I, E] and cond [N, C_cond, F, H, W]."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"pair_id", "x0_w", "x0_l", "text"} - set(data)
    if missing:
        raise KeyError(f"pair bundle {path} lacks {sorted(missing)}")
    n = len(data["pair_id"])
    return [PairLatents(int(data["pair_id"][i]), data["x0_w"][i], data["x0_l"][i], data["text"][i],
                        data["image"][i] if data.get("image") is not None else None,
                        data["cond"][i] if data.get("cond") is not None else None) for i in range(n)]

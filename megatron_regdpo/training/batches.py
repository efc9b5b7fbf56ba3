"""GT-Pair items -> the micro-batches of one step: keyed noise and timesteps, winner and loser stacked.

Legend: P pairs, B = 2P samples [winners; losers], C latent channels, F/H/W latent grid, T text tokens.
Noise and t are keyed by (seed, step, pair id), so every rank (and a resumed run) builds the same
batch with no communication; under CP each rank builds the full batch and the model keeps its chunk.
"""
from __future__ import annotations

import torch

from megatron_regdpo.data.pairs import collate
from megatron_regdpo.objectives.flow_matching import FlowMatchingSettings, make_pair_batch


def micro_batches(dataset, pair_ids: list[int], pairs_per_micro: int, *, seed: int, step: int,
                  fm: FlowMatchingSettings, device, dtype: torch.dtype, draw: int = 0) -> list[dict]:
    """`step`/`draw`: the noise key (the training step, or the cached reference's key; see trainer)."""
    out = []
    for start in range(0, len(pair_ids), pairs_per_micro):
        ids = pair_ids[start:start + pairs_per_micro]
        items = collate([dataset[i] for i in ids])
        w, l = items["winner_BCFhw"].to(device, torch.float32), items["loser_BCFhw"].to(device, torch.float32)
        pb = make_pair_batch(w, l, ids, seed=seed, step=step, settings=fm, draw=draw)
        x_t = pb.x_t_BCFHW
        if "cond_BCFhw" in items:  # I2V: mask + first-frame latent channels, the same for winner and loser
            cond = items["cond_BCFhw"].to(device, torch.float32)
            x_t = torch.cat([x_t, torch.cat([cond, cond])], dim=1)
        text = items["text_BTE"].to(device, torch.float32)
        image = items.get("image_BIE")
        out.append({
            "pair_ids": ids, "noise_step": step, "draw": draw, "x_t": x_t.to(dtype), "timestep": pb.timestep_B.to(device),
            "target": pb.target_BCFHW.to(device, torch.float32), "text": torch.cat([text, text]).to(dtype),
            "image": None if image is None else torch.cat([image, image]).to(device, dtype),
        })
    return out

"""Reading GT-Pairs for training: PairDataset (pair id -> tensors) and `collate`.

Legend: B pairs, C latent channels, F/h/w latent frames/height/width, T text tokens, E text width,
I image tokens; I2V adds `cond_BCFhw` (4 mask + C latent channels) and `image_BIE`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .sampler import PairSampler
from .store import GTPairStore


class PairDataset:
    """Pair i of the store's pair index: winner (real) and loser (generated) latents, text, I2V conditioning."""

    def __init__(self, store: str | Path | GTPairStore):
        self.store = store if isinstance(store, GTPairStore) else GTPairStore(store, "r")
        self.pairs = self.store.pair_index()
        if not self.pairs:
            raise ValueError(f"{self.store.path} has no pairs: run tools/make_gt_pairs.py first")
        self.i2v = self.store.attrs["task"] == "i2v"

    def __len__(self) -> int:
        return len(self.pairs)

    def shapes(self) -> list[tuple[int, ...]]:
        """Latent shape of every pair (for the sampler's grouping), from the log: no array is read."""
        real = self.store.records["real"]
        return [tuple(real[p.real_id]["latent_shape"]) for p in self.pairs]

    def sampler(self, micro_batch: int, dp_rank: int, dp_size: int, seed: int = 0) -> PairSampler:
        return PairSampler(self.shapes(), micro_batch, dp_rank, dp_size, seed)

    def __getitem__(self, i: int) -> dict:
        p = self.pairs[i]
        text_TE, mask_T = self.store.read_text(p.prompt_id)
        item = {"pair_id": i, "winner_CFhw": self.store.read_latents("real", p.real_id),
                "loser_CFhw": self.store.read_latents("generated", p.generated_id),
                "text_TE": text_TE, "text_mask_T": mask_T}
        if self.i2v:
            item["image_IE"], item["cond_CFhw"] = self.store.read_image(p.real_id)
        return item


def collate(items: list[dict]) -> dict:
    """Stack items: `_CFhw` -> `_BCFhw`, `_TE` -> `_BTE`, ...; pair ids as a list."""
    out = {"pair_ids": [it["pair_id"] for it in items]}
    for key in items[0]:
        if key != "pair_id":
            stem, suffix = key.rsplit("_", 1)
            out[f"{stem}_B{suffix}"] = torch.stack([it[key] for it in items])
    return out


def build_pair_sampler(data_cfg, dataset: PairDataset, dp_rank: int, dp_size: int, seed: int) -> PairSampler:
    """The sampler for the run config's `data` section (micro_batch_pairs per data-parallel rank)."""
    if dataset.store.attrs.get("text_len") != data_cfg.text_len:
        raise ValueError(f"data.text_len={data_cfg.text_len} but the store {dataset.store.path} has text_len="
                         f"{dataset.store.attrs.get('text_len')}")
    return dataset.sampler(data_cfg.micro_batch_pairs, dp_rank, dp_size, seed)

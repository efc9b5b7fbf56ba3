"""data/prefetch.py: the next step's pairs read in a background thread give the dataset's own items (the same
bits), each read once, a read's error raised where the item is used, nothing left running after close."""
from __future__ import annotations

import threading

import pytest
import torch

from megatron_regdpo.data.pairs import PairDataset, collate
from megatron_regdpo.data.prefetch import Prefetcher
from megatron_regdpo.data.store import GTPairStore, prompt_id

ATTRS = {"task": "t2v", "fps": 8, "frames": 9, "short_side": 64, "bucket": "1:1", "latent_dtype": "bf16",
         "text_len": 8, "vae": {"z_dim": 4, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4},
         "text_encoder": {"dim": 6}, "negative_prompt_id": prompt_id("")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    store = GTPairStore.open_or_create(tmp_path_factory.mktemp("prefetch") / "pairs.zarr", ATTRS)
    store.write_text(prompt_id(""), torch.randn(8, 6), torch.arange(8) < 1, "")
    for n in range(6):
        sid, pid = f"clip{n}", prompt_id(f"caption {n}")
        store.write_text(pid, torch.randn(8, 6), torch.arange(8) < 3, f"caption {n}")
        store.write_real(sid, torch.randn(4, 3, 2, 2), {"prompt_id": pid, "size": [16, 16]})
        store.write_generated(f"{sid}.gen.0", torch.randn(4, 3, 2, 2), {"real_id": sid, "generator": "gen", "k": 0})
    store.finalize()
    return PairDataset(store.path)


class Counted:
    """The dataset, counting its reads and the threads they ran on."""

    def __init__(self, dataset):
        self.dataset, self.reads, self.threads = dataset, [], set()

    def __getitem__(self, i):
        self.reads.append(i)
        self.threads.add(threading.current_thread().name)
        return self.dataset[i]

    def __len__(self):
        return len(self.dataset)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_prefetched_items_are_the_datasets_and_read_once(dataset):
    counted = Counted(dataset)
    pre = Prefetcher(counted)
    try:
        pre.prefetch([3, 1, 3])                            # 3 asked twice: read once
        got = collate([pre[i] for i in (3, 1, 4)])         # 4 was not prefetched: read now, on this thread
        assert _equal(got, collate([dataset[i] for i in (3, 1, 4)]))
        assert sorted(counted.reads) == [1, 3, 4]
        assert any(name.startswith("pair-prefetch") for name in counted.threads)
        assert len(pre) == len(dataset)
        pre.prefetch([3])
        pre.settle()                                       # the read is done, its item kept for use
        assert counted.reads[-1] == 3 and _equal(pre[3], dataset[3])
        pre.prefetch([5])
        pre.prefetch([2])                                  # 5 not asked for again: dropped, never piles up
        pre.settle()
        assert list(pre._pending) == [2] and _equal(pre[2], dataset[2])
    finally:
        pre.close()


def test_a_failed_read_is_raised_where_the_item_is_used(dataset):
    pre = Prefetcher(dataset)
    try:
        pre.prefetch([0, len(dataset) + 5])
        pre.settle()                                       # the failure is kept, not raised here
        assert _equal(pre[0], dataset[0])
        with pytest.raises(IndexError):
            pre[len(dataset) + 5]
    finally:
        pre.close()


def test_close_ends_the_thread_and_refuses_more(dataset):
    pre = Prefetcher(dataset)
    pre.prefetch(range(len(dataset)))
    pre.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("pair-prefetch")]
    assert _equal(pre[2], dataset[2])                      # read now: nothing pending after close
    with pytest.raises(RuntimeError, match="after close"):
        pre.prefetch([1])
    pre.close()                                            # twice is fine
    assert pre.shapes() == dataset.shapes() and pre.i2v is dataset.i2v and pre.store is dataset.store

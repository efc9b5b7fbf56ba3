"""tools/bench_pair_reads.py --quick: a store of synthetic I2V pairs read through the trainer's PairDataset and
Prefetcher, one JSONL row per stand-in step. Timings are recorded, never asserted (a shared CI machine); the
fields and the store's pairs are."""
from __future__ import annotations

import json

import torch
from conftest import tool

FIELDS = ("read_s", "compute_s", "overlapped_s", "waited_s")


def test_quick_run_writes_a_row_per_stand_in(tmp_path, capsys):
    out = tmp_path / "pair_reads.jsonl"
    assert tool("bench_pair_reads").main(["--quick", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == ["cpu", "wait"] and all(r["quick"] and r["repeats"] == 2 for r in rows)
    for r in rows:
        assert all(isinstance(r[k], float) and r[k] >= 0 for k in FIELDS), r
        assert r["hidden"] <= 1.0 and r["pair_mib"] > 0
    assert capsys.readouterr().out.count("one pair") == 2

    from megatron_regdpo.data.pairs import PairDataset
    from megatron_regdpo.experiments.pair_reads import make_store

    dataset = PairDataset(tmp_path / "pairs.zarr")   # the store the run wrote: 2 x 2 I2V pairs
    assert len(dataset) == 4 and dataset.i2v
    item = dataset[0]
    assert item["winner_CFhw"].shape == item["loser_CFhw"].shape == (4, 3, 8, 8) and item["cond_CFhw"].shape[0] == 8
    again = make_store(tmp_path / "again.zarr", 4, {"latents": (4, 3, 8, 8), "cond": (8, 3, 8, 8), "image": (4, 8),
                                                     "text": (8, 16)})
    assert torch.equal(again[3]["loser_CFhw"], dataset[3]["loser_CFhw"])   # seeded: the same pairs each time
    assert tool("bench_pair_reads").main(["--quick", "--workdir", str(tmp_path), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err   # a store left there is not written over

"""The zarr store: bf16 bit-exactness, the commit log, resumable writes, the checker."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import zarr

from megatron_regdpo.data.store import CommitLog, GTPairStore, check_store, prompt_id, read_array, safe_id, write_array

ATTRS = {"task": "t2v", "fps": 8, "frames": 9, "short_side": 64, "bucket": "1:1", "latent_dtype": "bf16",
         "text_len": 8, "vae": {"z_dim": 4, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4},
         "text_encoder": {"dim": 6}, "negative_prompt_id": prompt_id("")}


def _fill(store: GTPairStore, reals=("a", "b"), negatives=1) -> None:
    for sid in reals:
        pid = prompt_id(f"caption {sid}")
        store.write_text(pid, torch.randn(8, 6), torch.arange(8) < 3, f"caption {sid}")
        store.write_real(sid, torch.randn(4, 3, 2, 2), {"prompt_id": pid, "size": [16, 16]})
        for k in range(negatives):
            store.write_generated(f"{sid}.gen.{k}", torch.randn(4, 3, 2, 2),
                                  {"real_id": sid, "generator": "gen", "k": k})
    store.finalize()


def test_bf16_round_trip_is_bit_exact(tmp_path):
    group = zarr.open_group(str(tmp_path / "z"), mode="w")
    x = torch.randint(0, 2**16, (5, 7), dtype=torch.int32).to(torch.uint16).view(torch.bfloat16)  # any bits
    arr = write_array(group, "x", x)
    assert arr.dtype == "uint16" and arr.attrs["dtype"] == "bfloat16"
    assert torch.equal(read_array(group, "x").view(torch.uint16), x.view(torch.uint16))
    f = torch.randn(3, 4)
    write_array(group, "f", f)
    assert torch.equal(read_array(group, "f"), f)
    codecs = [c["name"] for c in arr.metadata.to_dict()["codecs"]]
    assert "blosc" in codecs and arr.chunks == arr.shape          # one chunk, compressed


def test_commit_log_drops_a_torn_last_line(tmp_path):
    log = CommitLog(tmp_path / "commits.jsonl")
    log.append({"kind": "real", "id": "a"})
    with log.path.open("a") as f:
        f.write('{"kind": "real", "id": "b"')                       # killed mid-line (no newline)
    assert [r["id"] for r in log.read()] == ["a"]
    log.repair()
    log.append({"kind": "real", "id": "c"})
    assert [r["id"] for r in log.read()] == ["a", "c"]


def test_ids():
    assert safe_id("dir/clip 01.mp4") == "dir__clip_01.mp4" and safe_id("ünï") == "_n_"
    assert prompt_id("x") == prompt_id("x") != prompt_id("y")
    with pytest.raises(ValueError, match="sample id"):
        safe_id("...")


def test_partial_samples_are_overwritten_and_cleaned(tmp_path):
    store = GTPairStore.open_or_create(tmp_path / "s.zarr", ATTRS)
    _fill(store, reals=("a",))
    # what a run killed mid-sample leaves: arrays of "b" (and an orphan "c") but no commit
    store.root["real"].create_group("b").create_array("latents", shape=(1,), dtype="uint16")
    store.root["text"].create_group("c")
    report = check_store(store.path)
    assert not report.ok and any("real/b has no commit" in p for p in report.problems)
    again = GTPairStore.open_or_create(tmp_path / "s.zarr", ATTRS)        # the rerun
    assert again.committed("real", "a") and not again.committed("real", "b")
    _fill(again, reals=("b",))
    report = check_store(again.path)
    assert report.ok, report.problems
    assert report.counts == {"real": 2, "generated": 2, "texts": 2, "image": 0, "pairs": 2}
    assert again.read_latents("real", "b").shape == (4, 3, 2, 2)
    assert [p.generated_id for p in again.pair_index()] == ["a.gen.0", "b.gen.0"]


def test_resuming_with_other_settings_is_refused(tmp_path):
    GTPairStore.open_or_create(tmp_path / "s.zarr", ATTRS)
    with pytest.raises(ValueError, match="frames=9.*frames=17"):
        GTPairStore.open_or_create(tmp_path / "s.zarr", {**ATTRS, "frames": 17})
    with pytest.raises(ValueError, match="vae.latents_std"):
        GTPairStore.open_or_create(tmp_path / "s.zarr", {**ATTRS, "vae": {**ATTRS["vae"], "latents_std": [2.0] * 4}})
    with pytest.raises(ValueError, match="not a GT-Pair store"):
        GTPairStore(tmp_path / "nowhere")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not empty and is not a GT-Pair store"):
        GTPairStore.open_or_create(tmp_path / "data", ATTRS)
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"


def test_writes_check_their_references(tmp_path):
    store = GTPairStore.open_or_create(tmp_path / "s.zarr", ATTRS)
    with pytest.raises(ValueError, match="not committed yet"):
        store.write_real("a", torch.zeros(4, 3, 2, 2), {"prompt_id": "p-missing"})
    _fill(store, reals=("a",), negatives=0)
    with pytest.raises(ValueError, match="differs from its real"):
        store.write_generated("a.g.0", torch.zeros(4, 5, 2, 2), {"real_id": "a", "generator": "g", "k": 0})
    with pytest.raises(ValueError, match="is not in the store"):
        store.write_generated("z.g.0", torch.zeros(4, 3, 2, 2), {"real_id": "z", "generator": "g", "k": 0})


def test_check_store_names_each_problem(tmp_path):
    store = GTPairStore.open_or_create(tmp_path / "s.zarr", ATTRS)
    _fill(store)
    assert check_store(store.path).ok
    shutil.rmtree(store.path / "generated" / "a.gen.0" / "latents" / "c")        # a lost chunk
    chunk = next(p for p in (store.path / "real" / "b" / "latents" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"garbage")                                                 # a corrupt chunk
    line = json.dumps({"kind": "real", "id": "b", "prompt_id": prompt_id("caption b"), "latent_shape": [4, 3, 2, 2]})
    with (store.path / "commits.jsonl").open("a") as f:
        f.write(line + "\n")                                                      # committed twice
    store = GTPairStore(store.path, "a")
    store.write_generated("b.gen.1", torch.randn(4, 3, 2, 2), {"real_id": "b", "generator": "gen", "k": 1})
    report = check_store(store.path)                                              # ... and no finalize
    text = "\n".join(report.problems)
    assert "generated/a.gen.0/latents has 0 of 1 chunks" in text
    assert "real/b/latents cannot be read" in text
    assert "real 'b' is committed more than once" in text
    assert "pair index (2 rows) does not match the commit log (3 negatives)" in text
    assert not any("real/b/latents" in p for p in check_store(store.path, deep=False).problems)  # not read
    assert "INVALID" in report.format()

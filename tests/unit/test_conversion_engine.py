"""The generic conversion engine and the diffusers-folder reader/writer (no model, no process group)."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from megatron_regdpo.checkpoint_io.engine import Rule, check_keys, fuse_heads, to_ours, to_theirs, unfuse_heads
from megatron_regdpo.checkpoint_io.hf_folder import INDEX, WEIGHTS, HFReader, write_hf_folder


# --------------------------------------------------------------------------- fuse_heads / unfuse_heads

@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("shape", [(4 * 5, 7), (4 * 5,)], ids=["weight", "bias"])
def test_unfuse_inverts_fuse(n, shape):
    heads = 4
    parts = [torch.randn(shape) for _ in range(n)]
    fused = fuse_heads(parts, heads)
    assert fused.shape == (n * shape[0], *shape[1:])
    back = unfuse_heads(fused, heads, n)
    assert len(back) == n
    for a, b in zip(parts, back):
        assert torch.equal(a, b)
        assert b.is_contiguous()
    # and the other way round: fuse(unfuse(x)) == x
    assert torch.equal(fuse_heads(unfuse_heads(fused, heads, n), heads), fused)


@pytest.mark.parametrize("n", [2, 3])
def test_fused_rows_are_grouped_per_head(n):
    """Rows of head h in the fused tensor are [part0_h; part1_h; ...] (Megatron's per-head QKV layout)."""
    heads, k, d = 3, 4, 5
    parts = [torch.randn(heads * k, d) for _ in range(n)]
    fused = fuse_heads(parts, heads)
    for h in range(heads):
        block = fused[h * n * k:(h + 1) * n * k]
        want = torch.cat([p[h * k:(h + 1) * k] for p in parts])
        assert torch.equal(block, want), f"head {h}"
    # explicit q/k/v check on labelled values: row r of q holds 100+r, of k 200+r, of v 300+r
    if n == 3:
        q, kk, v = (torch.arange(heads * k).float() + base for base in (100, 200, 300))
        fused = fuse_heads([q, kk, v], heads)
        assert fused[:3 * k].tolist() == [100, 101, 102, 103, 200, 201, 202, 203, 300, 301, 302, 303]
        assert fused[3 * k:3 * k + k].tolist() == [104, 105, 106, 107]


def test_fuse_heads_rejects_indivisible_rows():
    with pytest.raises(RuntimeError):
        fuse_heads([torch.randn(10, 2), torch.randn(10, 2)], heads=4)


# --------------------------------------------------------------------------- Rule, to_ours / to_theirs

def test_rule_validation():
    Rule("a.weight", ("x.weight",))
    Rule("qkv.weight", ("q.weight", "k.weight", "v.weight"), "heads")
    with pytest.raises(ValueError, match=r"unknown fuse 'cols'.*a\.weight"):
        Rule("a.weight", ("x.weight",), fuse="cols")
    with pytest.raises(ValueError, match=r"b\.weight.*exactly one source"):
        Rule("b.weight", ("x.weight", "y.weight"))
    with pytest.raises(ValueError, match="exactly one source"):
        Rule("c.weight", ())


def test_to_ours_to_theirs_round_trip():
    heads = 2
    theirs = {"emb.weight": torch.randn(6, 3), "q.weight": torch.randn(8, 5), "k.weight": torch.randn(8, 5),
              "v.weight": torch.randn(8, 5), "q.bias": torch.randn(8), "k.bias": torch.randn(8), "v.bias": torch.randn(8)}
    rules = [Rule("embedding.weight", ("emb.weight",)),
             Rule("qkv.weight", ("q.weight", "k.weight", "v.weight"), "heads"),
             Rule("qkv.bias", ("q.bias", "k.bias", "v.bias"), "heads")]
    ours = dict(to_ours(rules, theirs.__getitem__, heads))
    assert set(ours) == {"embedding.weight", "qkv.weight", "qkv.bias"}
    assert ours["embedding.weight"] is theirs["emb.weight"]
    assert ours["qkv.weight"].shape == (24, 5) and ours["qkv.bias"].shape == (24,)
    back = dict(to_theirs(rules, ours.__getitem__, heads))
    assert set(back) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(back[k], v), k


# --------------------------------------------------------------------------- check_keys

def test_check_keys_passes_on_match_and_honours_ignore():
    check_keys(["a", "b"], ["b", "a"], "x")
    check_keys(["a", "b", "junk"], ["a", "b"], "x", ignore=["junk"])


def test_check_keys_names_missing_and_unexpected():
    with pytest.raises(KeyError) as e:
        check_keys(["a", "b", "extra.one", "extra.two"], ["a", "b", "c", "d"], "some/folder")
    msg = str(e.value)
    assert "some/folder: key mismatch" in msg
    assert "missing (2): c, d" in msg
    assert "unexpected (2): extra.one, extra.two" in msg


def test_check_keys_only_missing_or_only_unexpected():
    with pytest.raises(KeyError) as e:
        check_keys(["a"], ["a", "b"], "w")
    assert "missing (1): b" in str(e.value) and "unexpected" not in str(e.value)
    with pytest.raises(KeyError) as e:
        check_keys(["a", "z"], ["a"], "w")
    assert "unexpected (1): z" in str(e.value) and "missing" not in str(e.value)


def test_check_keys_truncates_long_lists_but_counts_all():
    with pytest.raises(KeyError) as e:
        check_keys([], [f"k{i:02d}" for i in range(20)], "w")
    msg = str(e.value)
    assert "missing (20)" in msg and "k11" in msg and "k12" not in msg and msg.rstrip("'\"").endswith("...")


# --------------------------------------------------------------------------- HFReader errors

def _tensors(n=4, size=64):
    return {f"t{i}.weight": torch.randn(size) for i in range(n)}


def test_hf_reader_missing_config(tmp_path):
    save_file(_tensors(), str(tmp_path / WEIGHTS))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "config.json")) + ".*not a diffusers model folder"):
        HFReader(tmp_path)


def test_hf_reader_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        HFReader(tmp_path / "nope")


def test_hf_reader_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        HFReader(tmp_path)
    assert str(tmp_path) in str(e.value) and WEIGHTS in str(e.value) and INDEX in str(e.value)


def test_hf_reader_missing_shard(tmp_path):
    out = tmp_path / "hf"
    tensors = _tensors(4, 64)
    write_hf_folder(out, {"x": 1}, tensors.items(), max_shard_bytes=2 * 64 * 4)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == 2
    shards[1].unlink()
    reader = HFReader(out)  # the index is intact: the reader opens shards lazily
    assert sorted(reader.keys()) == sorted(tensors)
    index = json.loads((out / INDEX).read_text())["weight_map"]
    lost = next(k for k, f in index.items() if f == shards[1].name)
    kept = next(k for k, f in index.items() if f == shards[0].name)
    assert torch.equal(reader.read(kept), tensors[kept])
    with pytest.raises(FileNotFoundError, match=re.escape(str(shards[1])) + ".*is missing"):
        reader.read(lost)


def test_hf_reader_unknown_tensor(tmp_path):
    write_hf_folder(tmp_path / "hf", {}, _tensors(2).items())
    with pytest.raises(KeyError, match="no.such.tensor"):
        HFReader(tmp_path / "hf").read("no.such.tensor")


# --------------------------------------------------------------------------- write_hf_folder

def test_write_single_file(tmp_path):
    tensors = _tensors(3)
    out = tmp_path / "hf"
    paths = write_hf_folder(out, {"a": 1}, tensors.items())
    assert paths == [out / WEIGHTS]
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", WEIGHTS])
    assert json.loads((out / "config.json").read_text()) == {"a": 1}
    reader = HFReader(out)
    assert reader.config == {"a": 1}
    for k, v in tensors.items():
        assert torch.equal(reader.read(k), v)
    assert not (tmp_path / "hf.partial").exists()


def test_write_sharded(tmp_path):
    # 10 tensors of 256 B (fp32 x 64) plus one of 2 KiB that is bigger than a shard on its own
    tensors = {f"t{i}.weight": torch.randn(64) for i in range(10)}
    tensors["big.weight"] = torch.randn(512)
    tensors["half.weight"] = torch.randn(64, dtype=torch.float64).to(torch.bfloat16)
    out = tmp_path / "hf"
    paths = write_hf_folder(out, {"cfg": True}, tensors.items(), max_shard_bytes=3 * 256)
    assert len(paths) > 3
    n = len(paths)
    assert [p.name for p in paths] == [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert all(p.is_file() for p in paths)
    assert not (out / WEIGHTS).exists()
    assert not list(out.glob("*.tmp")) and not (tmp_path / "hf.partial").exists()
    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == {p.name for p in paths}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # no shard over the limit unless it holds a single oversized tensor
    by_file: dict[str, int] = {}
    for k, f in index["weight_map"].items():
        by_file[f] = by_file.get(f, 0) + tensors[k].numel() * tensors[k].element_size()
    for f, size in by_file.items():
        assert size <= 3 * 256 or [k for k, g in index["weight_map"].items() if g == f] == ["big.weight"]
    reader = HFReader(out)
    for k, v in tensors.items():
        got = reader.read(k)
        assert got.dtype == v.dtype and torch.equal(got, v), k


def test_write_into_empty_existing_folder(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    write_hf_folder(out, {}, _tensors(1).items())
    assert (out / WEIGHTS).is_file()


def test_write_refuses_non_empty_folder(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / WEIGHTS).write_bytes(b"old weights")
    consumed = []

    def stream():
        for k, v in _tensors(2).items():
            consumed.append(k)
            yield k, v

    with pytest.raises(FileExistsError, match=re.escape(str(out)) + ".*not empty"):
        write_hf_folder(out, {}, stream())
    assert sorted(p.name for p in out.iterdir()) == sorted(["keep.txt", WEIGHTS])
    assert (out / "keep.txt").read_text() == "precious"
    assert (out / WEIGHTS).read_bytes() == b"old weights"
    assert not (tmp_path / "hf.partial").exists()
    assert consumed == []  # refused before reading anything


def test_write_refuses_a_file(tmp_path):
    out = tmp_path / "hf"
    out.write_text("a file")
    with pytest.raises(FileExistsError):
        write_hf_folder(out, {}, _tensors(1).items())
    assert out.read_text() == "a file"

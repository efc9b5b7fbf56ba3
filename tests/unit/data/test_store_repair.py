"""check_store --repair: a store whose log commits samples more than once (two writers at once) is made valid
again with every sample kept whose arrays read back; a damaged one is uncommitted with its dependents, and
the next run makes it again. The repair takes the writer lock."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from megatron_regdpo.data.store import GTPairStore, check_store, prompt_id, repair_store

from test_store import ATTRS, _fill

ROOT = Path(__file__).resolve().parents[3]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _two_writers(path: Path, reals: tuple[str, ...]) -> GTPairStore:
    """What two preprocess + generate runs at once left behind: every sample written and committed twice."""
    store = GTPairStore.open_or_create(path, ATTRS)
    _fill(store, reals=reals)
    lines = (path / "commits.jsonl").read_text().splitlines()
    with (path / "commits.jsonl").open("a") as f:
        f.writelines(line + "\n" for line in lines)  # the second writer's commits of the same samples
    return store


def test_repair_drops_duplicate_commits_and_loses_no_sample(tmp_path):
    path = tmp_path / "s.zarr"
    reals = tuple(f"clip{i}" for i in range(12))
    _two_writers(path, reals)
    before = {(k, i): GTPairStore(path).read_latents(k, i) for k, i in
              [("real", r) for r in reals] + [("generated", f"{r}.gen.0") for r in reals]}
    report = check_store(path)
    assert sum("committed more than once" in p for p in report.problems) == 3 * len(reals)  # text, real, negative

    result = repair_store(path)
    assert result.duplicates == 3 * len(reals) and not result.uncommitted and result.pairs == len(reals)
    assert Path(result.backup).is_file() and len(Path(result.backup).read_text().splitlines()) == 6 * len(reals)
    after = check_store(path)
    assert after.ok, after.problems
    assert after.counts == {"real": 12, "generated": 12, "texts": 12, "image": 0, "pairs": 12}
    store = GTPairStore(path)
    for (kind, key), latents in before.items():
        assert torch.equal(store.read_latents(kind, key), latents)
    records = [json.loads(line) for line in (path / "commits.jsonl").read_text().splitlines()]
    assert len(records) == len({(r["kind"], r["id"]) for r in records}) == 36
    kinds = [r["kind"] for r in records]
    assert kinds.index("text") < kinds.index("real")                       # texts stay before their clips
    assert repair_store(path).format() == "nothing to repair: no sample is committed twice"


def test_a_damaged_duplicate_is_uncommitted_with_its_negatives_and_made_again(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    _two_writers(path, ("a", "b", "c"))
    chunk = next(p for p in (path / "real" / "b" / "latents" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"overlapping writers")                              # the two writes interleaved

    assert _tool("check_store").main([str(path), "--repair"]) == 0          # valid; b is to be made again
    out = capsys.readouterr().out
    assert "dropped 9 duplicate commit records" in out
    assert "uncommitted 2 samples" in out and "generated/b.gen.0" in out and "real/b" in out
    assert "real/b has no commit" not in out                               # finalize removed its arrays
    store = GTPairStore(path, "a")
    assert sorted(store.records["real"]) == ["a", "c"] and not (path / "real" / "b").exists()
    store.write_real("b", torch.randn(4, 3, 2, 2), {"prompt_id": prompt_id("caption b"), "size": [16, 16]})
    store.write_generated("b.gen.0", torch.randn(4, 3, 2, 2), {"real_id": "b", "generator": "gen", "k": 0})
    store.finalize()                                                       # what the rerun of the tools does
    assert check_store(path).ok
    assert _tool("check_store").main([str(path), "--repair"]) == 0
    assert "nothing to repair" in capsys.readouterr().out


def test_repair_waits_for_no_one_it_refuses_while_a_run_writes(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    _two_writers(path, ("a",))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from megatron_regdpo.data.store import GTPairStore; "
         "s = GTPairStore(sys.argv[1], 'a'); print('held', flush=True); time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _tool("check_store").main([str(path), "--repair"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: store") and f"pid {holder.pid}" in err
        assert len((path / "commits.jsonl").read_text().splitlines()) == 6  # untouched
    finally:
        holder.kill()
        holder.wait()
    text = GTPairStore(path).records["text"]
    assert list(text) == [prompt_id("caption a")]

"""tools/bench_throughput.py: sweep parsing, invalid points recorded without running, one real sweep (tiny store)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_regdpo.config import load_config
from megatron_regdpo.experiments.throughput import expand_sweep, run_point

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes/debug/tiny_cpu.yaml")


def _tool():
    spec = importlib.util.spec_from_file_location("bench_throughput_tool", ROOT / "tools/bench_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_expand_sweep_is_the_cartesian_product():
    cfg = load_config(TINY)
    assert expand_sweep(["parallel.cp=1,2", "parallel.tp=1,2"], cfg) == [
        ("parallel.cp=1", "parallel.tp=1"), ("parallel.cp=1", "parallel.tp=2"),
        ("parallel.cp=2", "parallel.tp=1"), ("parallel.cp=2", "parallel.tp=2")]
    assert expand_sweep([], cfg) == [()]
    assert expand_sweep(["objective.reference.mode=resident"], cfg) == [("objective.reference.mode=resident",)]


@pytest.mark.parametrize("spec, message", [("parallel.cp", "KEY=V1,V2"), ("parallel.cq=1,2", "'parallel.cq'"),
                                           ("parallel=1", "'parallel'"), ("parallel.cp=1,", "empty value")])
def test_expand_sweep_errors_name_the_sweep(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        expand_sweep([spec], load_config(TINY))
    assert spec in str(e.value)


def test_invalid_point_is_recorded_not_run(tmp_path):
    record = run_point(TINY, ("parallel.tp=2",), sets=["data.store=/nowhere"], world_size=1, steps=2, warmup=1,
                       workdir=tmp_path)
    assert record["status"].startswith("invalid: ") and "divisible" in record["status"]
    assert record["step_s"] is None and len(record["config_hash"]) == 12
    assert not any(tmp_path.iterdir())  # nothing was launched


def test_timed_out_point_is_recorded_and_ended(tmp_path):
    # ended with everything it started (the session guard in conftest.py fails the run on a leftover); the
    # store must exist (validate refuses a missing one): the run is ended long before it would read it
    record = run_point(TINY, (), sets=[f"data.store={tmp_path}"], world_size=1, steps=2, warmup=1,
                       workdir=tmp_path, timeout=1)
    assert record["status"].startswith("failed (rc timeout after 1 s)"), record["status"]


def test_cli_errors(tmp_path, capsys):
    main = _tool().main
    assert main(["--config", TINY, "--sweep", "model.recomp=none,full", "--out", str(tmp_path / "b.jsonl")]) == 2
    assert "model.recomp" in capsys.readouterr().err
    assert main(["--config", TINY, "--out", str(tmp_path / "b.jsonl")]) == 2
    assert "data.store" in capsys.readouterr().err


def test_end_to_end_sweep(tmp_path, capsys):
    out, png = tmp_path / "bench.jsonl", tmp_path / "bench.png"
    rc = _tool().main(["--config", TINY, "--tiny-store", str(tmp_path / "store"), "--world-size", "1",
                       "--sweep", "model.recompute=none,full", "--steps", "3", "--warmup", "1",
                       "--out", str(out), "--plot", str(png), "--workdir", str(tmp_path / "runs")])
    text = capsys.readouterr().out
    assert rc == 0, text
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["overrides"] for r in records] == [["model.recompute=none"], ["model.recompute=full"]]
    for r in records:
        assert r["status"] == "ok" and r["step_s"] > 0 and r["pairs_per_s"] > 0, r
        assert r["world_size"] == 1 and r["steps_measured"] == 2 and r["mfu"] is None
        assert r["machine"]["device"].startswith("cpu") and len(r["config_hash"]) == 12
    assert records[0]["config_hash"] != records[1]["config_hash"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| model.recompute=none | ok |" in text and "ratios only" in text
    print(text)

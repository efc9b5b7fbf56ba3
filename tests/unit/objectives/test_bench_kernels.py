"""tools/bench_kernels.py: one JSON line per measurement with the machine, sizes and bandwidth figures."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from megatron_regdpo.experiments.kernels import bench_sq_err, floor_bytes, format_table

ROOT = Path(__file__).resolve().parents[3]


def test_floor_bytes():
    # forward reads pred + target, writes N floats; backward also reads g and writes grad_pred
    assert floor_bytes(2, 100, 2) == (2 * 2 * 100 * 2 + 8, 2 * 2 * 100 * 2 + 8 + 2 * 100 * 2)


def test_bench_row():
    row = bench_sq_err(2, 4096, torch.bfloat16, "cpu", warmup=1, iters=2)
    assert row["impl"] == "torch" and row["dtype"] == "bfloat16" and (row["N"], row["M"]) == (2, 4096)
    assert row["fwd_gbs"] == row["fwd_bytes"] / (row["fwd_ms"] / 1e3) / 1e9
    assert {"node", "cpu_count"} <= set(row["machine"]) and "date" in row
    assert "fwd_gbs" in format_table([row])


def test_cli_writes_jsonl(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels_cli", ROOT / "tools" / "bench_kernels.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "b.jsonl"
    assert cli.main(["--sizes", "1000,3000", "--dtypes", "float32", "--iters", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted({r["M"] for r in rows}) == [1000, 3000]  # per backend: torch, and Triton on a GPU
    assert "fwd_ms" in capsys.readouterr().out

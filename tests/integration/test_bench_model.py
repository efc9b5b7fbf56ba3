"""tools/bench_model.py --quick: one JSONL row per dtype with timings, saved bytes and parity against diffusers.
Timings are recorded, never asserted (a shared CI machine); parity and the fields are."""
from __future__ import annotations

import json

import pytest
from conftest import tool

pytest.importorskip("diffusers")

FIELDS = ("ours_fwd_s", "diffusers_fwd_s", "ours_fwd_bwd_s", "diffusers_fwd_bwd_s", "fwd_ratio", "fwd_bwd_ratio",
          "fwd_ratio_paired", "fwd_bwd_ratio_paired",
          "ours_saved_bytes", "diffusers_saved_bytes", "saved_ratio", "output_rel_err", "grad_rel_err",
          "diffusers_output_rel_err", "diffusers_grad_rel_err", "grad_rel_err_l2", "diffusers_grad_rel_err_l2",
          "ours_python_fwd_bwd_s", "python_fwd_bwd_ratio_paired", "fused_vs_python_paired")


def test_quick_run_writes_rows_with_parity(tmp_path, capsys, fused_cpu_kernels):
    out = tmp_path / "bench_model.jsonl"
    assert tool("bench_model").main(["--quick", "--dtype", "fp32,bf16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["dtype"] for r in rows] == ["fp32", "bf16"] and all(r["quick"] for r in rows)
    for r in rows:
        assert all(isinstance(r[k], (int, float)) and r[k] > 0 for k in FIELDS if "err" not in k), r
        assert r["machine"]["torch"] and r["repeats"] == 3 and len(r["latent_FHW"]) == 3
        assert r["cpu_kernels"] == "built and loaded", r["cpu_kernels"]   # the fused CPU kernels ran
    fp32, bf16 = rows
    # fp32: the same function to rounding, every parameter's gradient included (as tests/unit/test_wan_parity.py)
    assert fp32["output_rel_err"] < 1e-5 and fp32["grad_rel_err"] < 1e-4, fp32
    assert fp32["diffusers_output_rel_err"] == 0 and fp32["diffusers_grad_rel_err"] == 0
    # bf16: ours is as far from the fp32 result as diffusers' own bf16 run is, up to rounding
    assert bf16["output_rel_err"] < 2 * bf16["diffusers_output_rel_err"] + 1e-3, bf16
    assert bf16["grad_rel_err"] < 2 * bf16["diffusers_grad_rel_err"] + 1e-2, bf16
    assert fp32["grad_rel_err_l2"] < 1e-5 and bf16["grad_rel_err_l2"] < 1.5 * bf16["diffusers_grad_rel_err_l2"], rows
    assert "| fp32 |" in text and "| bf16 |" in text


@pytest.mark.parametrize("args, message", [(["--dtype", "fp16"], "--dtype"), (["--hidden", "30"], "divisible"),
                                           (["--repeats", "0"], "--repeats")])
def test_cli_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        tool("bench_model").main([*args, "--out", str(tmp_path / "b.jsonl")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "b.jsonl").exists()

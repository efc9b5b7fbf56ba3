"""tools/gpu_check.py: its CPU smoke mode runs every step of the GPU check at tiny sizes (what keeps the
one-call GPU check from rotting between GPU sessions); bad input is one line; the wheel step installs
offline from a wheel folder; tools/gpu_wheels.sh is valid bash."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "gpu_check.py"
STEPS = ("install", "environment", "parity", "kernel", "step", "sampling", "gpu_tests")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, str(TOOL), "--cpu-smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, out


def test_cpu_smoke_runs_every_step(smoke):
    proc, out = smoke
    report = f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, report
    record = json.loads((out / "gpu_check.json").read_text())
    assert record["mode"] == "cpu-smoke" and record["finished"], record
    assert tuple(record["steps"]) == STEPS
    for name, entry in record["steps"].items():
        assert entry["status"] in ("ok", "skipped"), (name, entry.get("reason"), entry.get("traceback"))
        if entry["status"] == "skipped":
            assert entry["reason"], name
        assert entry["seconds"] >= 0, (name, entry)
    assert "gpu_check (cpu-smoke)" in proc.stdout.splitlines()[-len(STEPS) - 2]   # the table comes last
    md = (out / "gpu_check.md").read_text()
    assert "| step | status | s | summary |" in md and all(f"| {s} |" in md for s in STEPS)


def test_cpu_smoke_figures(smoke):
    steps = json.loads((smoke[1] / "gpu_check.json").read_text())["steps"]
    env = steps["environment"]["result"]
    assert _positive(env["matmul_tflops"]) and _positive(env["copy_gbs"])

    for case in steps["parity"]["result"]["cases"]:
        assert case["ok"] and 0 < case["out_rel_ours"] < 0.05 and case["grads_compared"] > 10, case

    if steps["kernel"]["status"] == "ok":
        kernel = steps["kernel"]["result"]
        assert kernel["checks"] and all(c["ok"] for c in kernel["checks"])
        assert {b["impl"] for b in kernel["bench"]} == {"triton", "torch"}
        assert all(_positive(b["fwd_gbs"]) and _positive(b["bwd_gbs"]) for b in kernel["bench"])

    step = steps["step"]["result"]
    rows = {r["config"]: r for r in step["configs"]}
    assert set(rows) == {"warmup", "lora16_full", "fullft_full", "fsdp2_fullft_full", "sweep_none", "sweep_selective",
                         "sweep_full", "sweep_full_offload"}
    for name, row in rows.items():
        for key in ("step_s", "model_tflops", "hardware_tflops", "peak_gib", "mfu"):
            assert _positive(row[key]), (name, key, row)
        if name != "warmup":
            assert _positive(row["planned_peak_gib"]) and abs(row["plan_rel_error"]) < 0.25, row
    assert rows["fullft_full"]["hardware_tflop"] == rows["lora16_full"]["hardware_tflop"]
    assert rows["fsdp2_fullft_full"]["hardware_tflop"] == rows["fullft_full"]["hardware_tflop"]
    assert set(step["recompute_cost"]) == {"selective", "full", "full_offload"}
    # offloading changes where the layer inputs live, not the work: same FLOPs, no more device memory
    assert rows["sweep_full_offload"]["hardware_tflop"] == rows["sweep_full"]["hardware_tflop"]
    assert rows["sweep_full_offload"]["peak_gib"] <= rows["sweep_full"]["peak_gib"]   # smoke sizes: often equal
    lean = step["lean"]
    assert len(lean["pieces"]) == 4 and all(_positive(p["lean_ms"]) for p in lean["pieces"]), lean

    sampling = steps["sampling"]["result"]
    assert _positive(sampling["seconds_per_clip"]) and sampling["steps_timed"] == sampling["steps_per_clip"]

    tests = steps["gpu_tests"]["result"]
    assert tests["counts"]["failed"] == tests["counts"]["error"] == 0 and tests["counts"]["skipped"] >= 1


@pytest.mark.parametrize("args,message", [([], "the following arguments are required: --out"),
                                          (["--out", "x", "--only", "nope"], "unknown step(s) nope")])
def test_bad_input_is_one_line(tmp_path, args, message):
    if args and "--out" in args:
        args = ["--out", str(tmp_path / "o"), *args[2:], "--cpu-smoke"]
    proc = subprocess.run([sys.executable, str(TOOL), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_gpu_mode_without_a_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the GPU mode would run")
    proc = subprocess.run([sys.executable, str(TOOL), "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no CUDA device"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _fake_wheel(folder: Path, name: str = "regdpo_fake_pkg") -> Path:
    """A minimal pure-Python wheel, so the install step can be run offline."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {f"{name}/__init__.py": "__version__ = '1.0'\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_install_step_installs_missing_packages_from_wheels(tmp_path, monkeypatch):
    from megatron_regdpo.experiments.gpu_check import install
    from megatron_regdpo.experiments.gpu_check.runner import Context, Skip
    from megatron_regdpo.experiments.gpu_check.sizes import SMOKE

    wheels = tmp_path / "whl"
    wheels.mkdir()
    _fake_wheel(wheels)
    ctx = Context(SMOKE, tmp_path, wheels, tmp_path / "site", ROOT)
    monkeypatch.setattr(install, "REQUIRED", {"regdpo_fake_pkg": "regdpo-fake-pkg"})
    monkeypatch.setattr(sys, "path", list(sys.path))
    result = install.run(ctx)
    assert result["versions"] == {"regdpo_fake_pkg": "1.0"} and ctx.site_active
    assert str(tmp_path / "site") in ctx.subprocess_env()["PYTHONPATH"].split(os.pathsep)
    with pytest.raises(Skip, match="import already"):
        install.run(ctx)
    sys.modules.pop("regdpo_fake_pkg", None)


def test_install_step_without_wheels_names_the_fix(tmp_path, monkeypatch):
    from megatron_regdpo.experiments.gpu_check import install
    from megatron_regdpo.experiments.gpu_check.runner import Context
    from megatron_regdpo.experiments.gpu_check.sizes import SMOKE

    ctx = Context(SMOKE, tmp_path, tmp_path / "none", tmp_path / "site", ROOT)
    monkeypatch.setattr(install, "REQUIRED", {"regdpo_missing_pkg": "x"})
    with pytest.raises(RuntimeError, match="gpu_wheels.sh"):
        install.run(ctx)


def test_gpu_wheels_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(ROOT / "tools" / "gpu_wheels.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_install_takes_only_the_missing_packages_wheels():
    from megatron_regdpo.experiments.gpu_check.install import _needed

    wheels = [Path("megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl"),
              Path("diffusers-0.42.1-py3-none-any.whl"), Path("some_dep-1.0-py3-none-any.whl")]
    assert [w.name for w in _needed(wheels, ["diffusers"])] == [wheels[1].name, wheels[2].name]
    assert _needed(wheels, ["megatron.core", "diffusers"]) == wheels

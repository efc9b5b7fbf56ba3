"""`python -m megatron_regdpo.train`, called in-process: --dry-run for every recipe, config errors, the smoke run.

Note: a dry run with $WORLD_SIZE > 1 in the environment (and no --world-size) does not only validate against
that size: dry_run()'s distributed_session() -> init_distributed() reads WORLD_SIZE too and waits for that
many ranks to join (or fails without MASTER_ADDR). The tests never set a valid WORLD_SIZE for that reason.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_regdpo.train import main

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"

# Every runnable recipe and the world size it is written for. A new recipe must be added here.
INTENDED_WORLD_SIZE = {
    "debug/tiny_cpu.yaml": 1,
    "debug/tiny_cpu_tp2.yaml": 2,
    "wan1.3b/regdpo_t2v_h100x8.yaml": 8,
    "wan14b/regdpo_t2v_h100x64.yaml": 64,
    "wan14b/regdpo_i2v_h100x8.yaml": 8,
}
T2V_14B = str(RECIPES / "wan14b/regdpo_t2v_h100x64.yaml")
TINY = str(RECIPES / "debug/tiny_cpu.yaml")


def _recipes() -> list[str]:
    return sorted(p.relative_to(RECIPES).as_posix() for p in RECIPES.rglob("*.yaml")
                  if p.relative_to(RECIPES).parts[0] != "base")


def _layout_line(out: str) -> re.Match:
    m = re.search(r"^# layout\nTP=(\d+) PP=(\d+) CP=(\d+) DP=(\d+) \(world (\d+)\)", out, re.M)
    assert m, f"no layout in:\n{out}"
    return m


# --------------------------------------------------------------------------- dry runs

def test_dry_run_14b_t2v_at_64(capsys):
    rc = main(["--config", T2V_14B, "--dry-run", "--world-size", "64"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "total: 14,288,491,584" in out
    m = _layout_line(out)
    assert tuple(map(int, m.groups())) == (4, 1, 4, 4, 64)
    assert "sequence parallel" in out
    assert "75600 tokens/clip, 18900 per CP rank" in out
    assert "stage 0: layers 0-39" in out
    assert "Wan2.1 14B t2v: 40 layers, hidden 5120 (40 heads x 128)" in out
    assert out.rstrip().endswith("valid: yes")
    # the resolved config is printed, with the recipe's overrides of its base applied
    assert "# resolved config" in out and "regdpo-t2v-14b-h100x64" in out


def test_every_recipe_has_an_intended_world_size():
    found = _recipes()
    assert found, f"no recipes found under {RECIPES}"
    unmapped = [r for r in found if r not in INTENDED_WORLD_SIZE]
    assert not unmapped, f"recipes without an entry in INTENDED_WORLD_SIZE (add them): {unmapped}"
    stale = [r for r in INTENDED_WORLD_SIZE if r not in found]
    assert not stale, f"INTENDED_WORLD_SIZE names recipes that no longer exist: {stale}"


@pytest.mark.parametrize("recipe", _recipes())
def test_recipe_dry_runs_at_its_world_size(recipe, capsys):
    if recipe not in INTENDED_WORLD_SIZE:
        pytest.fail(f"{recipe}: no intended world size in INTENDED_WORLD_SIZE; add it")
    world = INTENDED_WORLD_SIZE[recipe]
    rc = main(["--config", str(RECIPES / recipe), "--dry-run", "--world-size", str(world)])
    out, err = capsys.readouterr()
    assert rc == 0, f"{recipe} at world size {world}:\n{err}"
    tp, pp, cp, dp, w = map(int, _layout_line(out).groups())
    assert w == world and tp * pp * cp * dp == world
    assert re.search(r"^total: \d{1,3}(,\d{3})*$", out, re.M)
    assert "valid: yes" in out


def test_world_size_defaults_to_env(capsys, monkeypatch):
    # An invalid size, so validation stops before any process group is set up: with a valid WORLD_SIZE
    # the dry run's distributed_session() would rendezvous for that many ranks (see the module note).
    monkeypatch.setenv("WORLD_SIZE", "63")
    assert main(["--config", T2V_14B, "--dry-run"]) == 2
    assert "world size 63 is not divisible" in capsys.readouterr().err


def test_pipeline_parallel_dry_run(capsys):
    rc = main(["--config", T2V_14B, "--dry-run", "--world-size", "64", "parallel.pp=4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert tuple(map(int, _layout_line(out).groups())) == (4, 4, 4, 1, 64)
    for s in range(4):
        assert f"stage {s}: layers {10 * s}-{10 * s + 9}" in out
    assert "stage 4:" not in out
    stage_counts = [int(n.replace(",", "")) for n in re.findall(r"^stage \d: ([\d,]+) \(", out, re.M)]
    assert len(stage_counts) == 4
    # every stage holds 10 blocks plus the replicated conditioning; the sum over-counts that conditioning
    assert sum(stage_counts) > 14_288_491_584
    assert max(stage_counts) - min(stage_counts) < 0.001 * stage_counts[0]
    assert "total: 14,288,491,584" in out


# --------------------------------------------------------------------------- invalid configurations

def _invalid(argv, capsys) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, f"expected exit 2, got {rc}; stdout:\n{out}\nstderr:\n{err}"
    assert "valid: yes" not in out
    assert err.startswith("invalid config: "), err
    return err


def test_world_size_not_divisible(capsys):
    err = _invalid(["--config", T2V_14B, "--dry-run", "--world-size", "63"], capsys)
    assert "world size 63 is not divisible by tp*pp*cp = 16" in err


def test_unknown_override_key_suggests(capsys):
    err = _invalid(["--config", T2V_14B, "--dry-run", "--world-size", "64", "parallel.tpp=2"], capsys)
    assert "parallel.tpp" in err and "did you mean 'parallel.tp'" in err


def test_override_of_wrong_type(capsys):
    err = _invalid(["--config", T2V_14B, "--dry-run", "--world-size", "64", "parallel.tp=abc"], capsys)
    assert "parallel.tp" in err and "expected int" in err and "abc" in err


def test_fp8_needs_transformer_engine(capsys):
    err = _invalid(["--config", T2V_14B, "--dry-run", "--world-size", "64", "model.backend=local"], capsys)
    assert "precision.fp8='delayed' requires model.backend='te'" in err and "backend='local'" in err


def test_missing_config_file(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    err = _invalid(["--config", str(missing), "--dry-run"], capsys)
    assert str(missing) in err


def test_invalid_config_is_rejected_before_the_smoke_run(capsys, tmp_path):
    """Without --dry-run the recipe is validated too, and nothing is written."""
    _invalid(["--config", TINY, "--world-size", "3", "parallel.tp=2", f"run.output_dir={tmp_path}"], capsys)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- the smoke run

def test_smoke_run(pg, capsys, tmp_path):
    rc = main(["--config", TINY, f"run.output_dir={tmp_path}"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "built Wan2.1 debug (t2v): 147,200 parameters" in out
    assert "bitwise equal" in out and "DIFFER" not in out
    run_dir = tmp_path / "tiny-cpu"
    ckpts = [p for p in run_dir.iterdir()]
    assert len(ckpts) == 1, ckpts
    ckpt = ckpts[0]
    assert ckpt.is_dir() and not ckpt.name.endswith(".partial")
    assert str(ckpt) in out
    meta = json.loads((ckpt / "model.json").read_text())
    assert meta["family"] == "wan2.1" and meta["dtype"] == "torch.float32"
    assert meta["arch"]["num_layers"] == 2 and meta["arch"]["num_heads"] == 4
    assert not list(tmp_path.rglob("*.partial"))
    # the session's process group is still there for the tests that follow
    import torch.distributed as dist

    assert dist.is_initialized()

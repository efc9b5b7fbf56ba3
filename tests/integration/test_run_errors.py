"""Run-time user errors end as one line and exit 2, not as a traceback on every rank (issue 14, item 7): a
data.store that does not exist, a global batch larger than the data, a store that grew since the run's
checkpoint, a truncated safetensors file given to tools/convert_checkpoint.py import."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from test_consistency import ATTRS, RECIPE, ROOT, _train, make_store


def _one_line(capsys, rc, prefix="invalid config: ") -> str:
    err = "\n".join(l for l in capsys.readouterr().err.splitlines() if l.startswith(("invalid config", "error")))
    assert rc == 2 and err.startswith(prefix) and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_missing_store_is_one_line_in_the_dry_run_and_before_training(tmp_path, capsys):
    from megatron_regdpo.train import main

    typo = tmp_path / "pairs.zar"
    err = _one_line(capsys, main(["--config", RECIPE, "--dry-run", f"data.store={typo}"]))
    assert f"data.store={typo} does not exist" in err and "data.store=null" in err
    assert f"data.store={typo} does not exist" in _one_line(capsys, _train(typo, tmp_path / "run"))
    assert not (tmp_path / "run").exists()                      # stopped before any rank built anything


def test_a_folder_that_is_not_a_store_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _one_line(capsys, _train(tmp_path / "empty", tmp_path / "run"))
    assert f"data.store={tmp_path / 'empty'}: " in err and "not a GT-Pair store" in err


def test_a_global_batch_larger_than_the_data_names_the_counts(tmp_path, capsys):
    store = make_store(tmp_path / "pairs.zarr", [(16, 3, 8, 8)] * 3)
    batch = ("data.global_batch_pairs=4", "data.micro_batch_pairs=4")
    err = _one_line(capsys, _train(store, tmp_path, *batch, "eval.holdout_pairs=1"))
    assert (f"data.global_batch_pairs=4 is larger than the data: {store} has 3 pairs, 1 of them held out by "
            f"eval.holdout_pairs, so 2 training pairs") in err and "to at most 2" in err


def test_no_bucket_filling_a_batch_is_one_line_under_drop(tmp_path, capsys):
    store = make_store(tmp_path / "pairs.zarr", [(16, 3, 8, 8)] * 2 + [(16, 3, 8, 10)] * 2, {**ATTRS, "bucket": "auto"})
    err = _one_line(capsys, _train(store, tmp_path, "data.global_batch_pairs=4", "data.micro_batch_pairs=4",
                                   "data.small_buckets=drop"))
    assert "no latent shape bucket of" in err and "[16, 3, 8, 10]: 2" in err and "data.global_batch_pairs=4" in err


def test_resuming_on_a_store_that_grew_names_the_counts_and_the_options(tmp_path, capsys):
    store = make_store(tmp_path / "pairs.zarr", [(16, 3, 8, 8)] * 3)
    assert _train(store, tmp_path) == 0
    shutil.rmtree(store)
    make_store(store, [(16, 3, 8, 8)] * 4)                      # the same path, one pair more
    err = _one_line(capsys, _train(store, tmp_path, "schedule.train_steps=2"))
    ckpt = tmp_path / "tiny-cpu" / "checkpoints" / "iter_0000001"
    assert f"{ckpt} cannot resume on data.store={store}" in err and "3 training pairs then, 4 now" in err
    assert "start a new run in another folder" in err


def test_import_of_a_truncated_safetensors_file_names_it(pg, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from megatron_regdpo.models.wan.arch import SIZES

    spec = importlib.util.spec_from_file_location("convert_tool", ROOT / "tools" / "convert_checkpoint.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    model = diffusers.WanTransformer3DModel(**SIZES["debug"].diffusers_config())
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")   # sharded: the second file is cut short
    shard = sorted((tmp_path / "hf").glob("*-00002-of-*.safetensors"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")])
    assert rc == 2 and err.getvalue().startswith(f"error: {shard} is truncated or corrupt"), err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1 and not (tmp_path / "ckpt").exists()


def test_two_ranks_say_a_config_error_once(tmp_path):
    """Under torchrun every rank raises the same error; the node's first process says it, the job exits 2."""
    import subprocess
    import sys

    from megatron_regdpo.parallel.procs import run_tree

    torchrun = str(Path(sys.executable).parent / "torchrun")
    log = tmp_path / "log"
    with open(log, "w") as out:
        rc = run_tree([torchrun, "--standalone", "--nproc-per-node=2", "-m", "megatron_regdpo.train", "--config",
                       RECIPE, f"data.store={tmp_path / 'nowhere'}", "data.global_batch_pairs=2"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                      env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    lines = log.read_text().splitlines()
    said = [line for line in lines if "invalid config:" in line]
    assert rc != 0 and len(said) == 1 and "does not exist" in said[0], lines[-20:]
    # no worker traceback (torchrun itself reports the failed worker with its own ChildFailedError)
    assert not any(line.strip().startswith("File") and "megatron_regdpo" in line for line in lines), lines[-30:]

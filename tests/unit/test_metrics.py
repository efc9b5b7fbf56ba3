"""training/metrics.py and metrics_log.py: stable names, the JSONL log (flushed, killed-run and resume tolerant), console summary,
optional TensorBoard/W&B missing -> a clear error (present: tests/integration/test_logging_sinks.py), micro-batch and data-parallel
averaging (2 spawned gloo ranks), the DGR alarm."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_regdpo.config.schema import LoggingConfig
from megatron_regdpo.objectives.reg_dpo import RegDPOSettings, reg_dpo_loss, reg_dpo_metrics
from megatron_regdpo.parallel.spawn import run_world
from megatron_regdpo.training.metrics import (
    OBJECTIVE_NAMES, PREFIXES, STEP_NAMES, DGRAlarm, average_microbatches, objective_metrics, peak_memory_gb,
    read_metrics, reduce_over_group, step_metrics,
)
from megatron_regdpo.training.metrics_log import MetricsLogger, format_summary

ROOT = Path(__file__).resolve().parents[2]
NO_FILES = LoggingConfig(jsonl=False)


def _errors(pairs: int, seed: int = 0):
    """Four per-pair error vectors with a spread of s (some pairs preferred, some not)."""
    g = torch.Generator().manual_seed(seed)
    pol_w, pol_l, ref_w, ref_l = (0.5 + 0.01 * torch.randn(pairs, generator=g, dtype=torch.float64) for _ in range(4))
    return pol_w, pol_l, ref_w, ref_l


def _objective(errors, sl=slice(None)):
    return objective_metrics(reg_dpo_metrics(reg_dpo_loss(*(e[sl] for e in errors), RegDPOSettings(beta=500.0))))


def _step(step: int, loss: float = 0.69, dgr: float = 125.0) -> dict:
    obj = {k: 0.0 for k in OBJECTIVE_NAMES} | {"loss/total": loss, "dpo/dgr": dgr, "dpo/implicit_acc": 0.5}
    return step_metrics(obj, step=step, lr=5e-6, grad_norm=torch.tensor(1.25), skipped_steps=0, pairs=16,
                        step_s=2.0, peak_gb=60.0)


# ------------------------------------------------------------------------------------------- the names
def test_objective_names_are_the_objectives_metrics_namespaced():
    raw = reg_dpo_metrics(reg_dpo_loss(*_errors(4)))
    assert "err_pol_w" in raw  # the objective leaves these bare; the step dict must not
    named = objective_metrics(raw)
    assert set(named) == set(OBJECTIVE_NAMES)
    assert named["dpo/err_pol_w"] == raw["err_pol_w"] and named["dpo/dgr"] == raw["dpo/dgr"]
    assert objective_metrics(named) == named  # idempotent


def test_step_dict_has_exactly_the_stable_names():
    m = _step(7)
    assert set(m) == set(STEP_NAMES) and len(STEP_NAMES) == len(set(STEP_NAMES))
    assert all(k == "step" or k.startswith(PREFIXES) for k in m)
    assert {k.split("/")[0] + "/" for k in m if k != "step"} == set(PREFIXES)
    assert m["step"] == 7 and m["optim/grad_norm"] == 1.25  # tensors become floats
    assert m["throughput/pairs_per_s"] == 8.0 and m["throughput/samples_per_s"] == 16.0
    json.dumps(m)


def test_unprefixed_objective_metric_is_an_error():
    with pytest.raises(ValueError, match="'kl'.*prefixes"):
        objective_metrics({"kl": 1.0})


def test_peak_memory_on_cpu_is_the_rss():
    assert 0.01 < peak_memory_gb("cpu") < 1024


# ---------------------------------------------------------------------------------------------- JSONL
def test_jsonl_lines_are_flushed_per_step_and_summary_every_interval(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(tmp_path / "run", LoggingConfig(interval=2), rank=0, world=1, total_steps=10,
                           progress=False, stream=out)
    for step in (1, 2, 3):
        logger.log(_step(step, loss=1.0 / step))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()  # read before close: flushed
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3] and all(isinstance(r["time"], float) for r in records)
    assert set(records[0]) == set(STEP_NAMES) | {"time"}
    assert records[1]["loss/total"] == 0.5
    summary = "step 2/10 | loss 0.5000 | dgr 125.00 | acc 0.50 | lr 5.00e-06 | gnorm 1.25 | 2.00 s/step\n"
    assert out.getvalue() == summary
    logger.close()


def test_only_the_writer_rank_writes(tmp_path):
    out = io.StringIO()
    with MetricsLogger(tmp_path / "run", LoggingConfig(), rank=1, world=2, progress=True, stream=out) as logger:
        logger.log(_step(1))
        logger.message("only rank 0 prints")
    assert not (tmp_path / "run").exists() and out.getvalue() == ""
    with MetricsLogger(tmp_path / "last", LoggingConfig(), rank=1, world=2, writer_rank=1, progress=False,
                       stream=out) as logger:  # e.g. the last pipeline stage
        logger.log(_step(1))
    assert len(read_metrics(tmp_path / "last" / "metrics.jsonl")) == 1


def test_progress_bar_and_summary_together(tmp_path, capsys):
    out = io.StringIO()
    with MetricsLogger(tmp_path, NO_FILES, rank=0, world=1, total_steps=3, progress=True, stream=out) as logger:
        for step in (1, 2, 3):
            logger.log(_step(step))
        logger.message("saved step 3")
    assert out.getvalue().count("\n") == 4 and out.getvalue().endswith("s/step\nsaved step 3\n")
    assert "3/3" in capsys.readouterr().err
    with pytest.raises(ValueError, match="logging.interval must be >= 1"):
        MetricsLogger(tmp_path, LoggingConfig(interval=0), rank=0, world=1)


_KILLED_RUN = """
import os, signal, sys
from megatron_regdpo.config.schema import LoggingConfig
from megatron_regdpo.training.metrics_log import MetricsLogger
logger = MetricsLogger(sys.argv[1], LoggingConfig(interval=100), rank=0, world=1, progress=False)
for step in range(1, 6):
    logger.log({"step": step, "loss/total": 1.0 / step})
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit, no buffer flush at exit
"""


def test_killed_run_keeps_its_lines_and_resume_appends_cleanly(tmp_path, caplog):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(run)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    path = run / "metrics.jsonl"
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]

    with open(path, "a") as f:  # a kill in the middle of a write
        f.write('{"step": 6, "loss/to')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    assert "truncated last line" in caplog.text

    # the resumed run (from a checkpoint at step 3) cuts the fragment and the rows of steps 4 and 5, which it
    # logs again: one row per step in the file itself, not only through read_metrics
    with caplog.at_level(logging.WARNING):
        with MetricsLogger(run, LoggingConfig(interval=100), rank=0, world=1, progress=False,
                           start_step=3) as logger:
            assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
            for step in (4, 5, 6):
                logger.log({"step": step, "loss/total": 10.0 * step})
    assert "dropping a partial last line" in caplog.text and "dropping 2 rows after step 3" in caplog.text
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss/total"] for r in records[3:]] == [40.0, 50.0, 60.0]  # the resumed run's values


# ----------------------------------------------------------------------------------- optional backends
@pytest.mark.parametrize("key, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
@pytest.mark.parametrize("rank", [0, 1])
def test_missing_optional_package_is_a_clear_error_on_every_rank(tmp_path, monkeypatch, key, module, rank):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed (the `logging` extra is left out)
    with pytest.raises(ImportError, match=rf"logging\.{key}=true needs the '{key}' package.*logging\.{key}=false"):
        MetricsLogger(tmp_path, LoggingConfig(**{key: True}), rank=rank, world=2, progress=False)


# ------------------------------------------------------------------------------------------- averaging
def test_microbatch_average_is_weighted_by_pairs():
    assert average_microbatches([{"a": 1.0}, {"a": 4.0}], num_pairs=[1, 3]) == {"a": 3.25}
    assert average_microbatches([{"a": 1.0}, {"a": 4.0}]) == {"a": 2.5}
    # every metric is a pair mean: micro-batches of 3 and 2 pairs, weighted, equal the 5-pair step
    errors = _errors(5)
    full = _objective(errors)
    avg = average_microbatches([_objective(errors, slice(0, 3)), _objective(errors, slice(3, 5))], [3, 2])
    assert avg.keys() == full.keys()
    for k in full:
        assert avg[k] == pytest.approx(full[k], rel=1e-12, abs=1e-15), k
    with pytest.raises(ValueError, match="other metric names"):
        average_microbatches([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(ValueError, match="2 metric dicts but 1 pair counts"):
        average_microbatches([{"a": 1.0}, {"a": 1.0}], [1])


def test_reduce_without_a_group_is_a_no_op():
    assert reduce_over_group({"a": 2}, None, num_pairs=3) == {"a": 2.0}


def _dp_worker(rank: int, world: int, payload):
    """Spawned rank: the 5-pair problem split 3 / 2 over two data-parallel ranks."""
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        errors = _errors(5)
        sl, pairs = (slice(0, 3), 3) if rank == 0 else (slice(3, 5), 2)
        local = _objective(errors, sl)
        weighted = reduce_over_group(local, dist.group.WORLD, num_pairs=pairs)
        equal = reduce_over_group({"x": float(rank)}, dist.group.WORLD)
        singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
        alone = reduce_over_group({"x": float(rank)}, singles[rank])
        try:
            reduce_over_group({"loss/a" if rank == 0 else "loss/b": 1.0}, dist.group.WORLD)
            mismatch = None
        except RuntimeError as e:
            mismatch = str(e)
        return weighted, equal, alone, mismatch
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_data_parallel_reduction_on_two_gloo_ranks():
    full = _objective(_errors(5))
    results = run_world(2, _dp_worker, None)
    for rank, (weighted, equal, alone, mismatch) in enumerate(results):
        assert weighted.keys() == full.keys()
        for k in full:
            assert weighted[k] == pytest.approx(full[k], rel=1e-12, abs=1e-15), (rank, k)
        assert equal == {"x": 0.5} and alone == {"x": float(rank)}
        assert mismatch is not None and "disagree on the metric names" in mismatch
    assert results[0][0] == results[1][0]  # bitwise the same on both ranks


# ----------------------------------------------------------------------------------------------- alarm
def test_dgr_alarm_warns_once_per_crossing_and_rearms(caplog):
    alarm = DGRAlarm.from_beta_eff(250.0, window=3)  # beta 500, diffusion_dpo: initial DGR 125, threshold 6.25
    assert alarm.initial_dgr == 125.0 and alarm.threshold == 6.25 and alarm.rearm_threshold == 12.5
    fired = []
    with caplog.at_level(logging.WARNING, logger="megatron_regdpo.training.metrics"):
        for step, dgr in enumerate([1.0, 1.0], 1):  # window not full yet: no verdict
            fired.append(alarm.update(dgr, step))
        for step, dgr in enumerate([1.0, 1.0, 1.0, 10.0, 10.0, 10.0, 20.0, 20.0, 20.0, 2.0, 2.0, 2.0], 3):
            fired.append(alarm.update(dgr, step))
    # the mean first drops below 6.25 at step 3; 10 (above 6.25, below 12.5) does not re-arm; 20 does
    assert [s for s, f in enumerate(fired, 1) if f] == [3, 14]
    assert alarm.alarms == 2 and len(caplog.records) == 2
    assert "DGR collapse alarm at step 3" in caplog.records[0].getMessage()
    assert "below 6.25" in caplog.records[0].getMessage()


def test_dgr_alarm_stays_quiet_on_a_healthy_run_and_checks_arguments():
    alarm = DGRAlarm(125.0)
    assert not any(alarm.update(125.0 - 0.05 * i) for i in range(200))
    for bad in (dict(initial_dgr=0.0), dict(initial_dgr=1.0, fraction=1.5), dict(initial_dgr=1.0, window=0),
                dict(initial_dgr=1.0, fraction=0.1, rearm_fraction=0.05)):
        with pytest.raises(ValueError):
            DGRAlarm(**bad)


def test_format_summary_skips_missing_names():
    assert format_summary({"step": 4, "loss/total": 0.5}) == "step 4 | loss 0.5000"

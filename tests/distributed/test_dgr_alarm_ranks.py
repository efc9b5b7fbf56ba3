"""The DGR collapse alarm of a 2-rank data-parallel run is said once per alarm, by the metrics writer (rank 0),
not once per rank (issue 14: it was printed twice for one step). Every rank reduces the same DGR; an alarm
made to fire at step 1 (its threshold above the run's starting DGR, never re-armed) must warn once in the run."""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import pytest

from _harness import run_world
from _stores import make_store

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "debug" / "tiny_cpu.yaml")
STEPS = 2


class _Count(logging.Filter):
    """Counts the alarm records logged (a filter, not a handler: where they are printed stays as it is)."""

    def __init__(self):
        super().__init__()
        self.steps: list[str] = []

    def filter(self, record):
        if "DGR collapse alarm" in record.getMessage():
            self.steps.append(record.getMessage().split(":")[0])
        return True


def _train_with_an_alarm_at_step_1(rank: int, world: int, out: str) -> dict:
    import megatron_regdpo.training.trainer as trainer
    from megatron_regdpo.train import main
    from megatron_regdpo.training.metrics import DGRAlarm

    class AtStep1(DGRAlarm):  # the DGR starts at beta_eff / 2, below 0.9 * beta_eff; re-arms above 1.8 * beta_eff
        @classmethod
        def from_beta_eff(cls, beta_eff, **kwargs):
            return cls(beta_eff, fraction=0.9, window=1)

    trainer.DGRAlarm = AtStep1
    count, err = _Count(), io.StringIO()
    logging.getLogger("megatron_regdpo.training.metrics").addFilter(count)
    with contextlib.redirect_stderr(err):
        rc = main(["--config", RECIPE, f"data.store={Path(out) / 'pairs.zarr'}", f"run.output_dir={out}",
                   f"schedule.train_steps={STEPS}", "data.global_batch_pairs=2", "logging.interval=1"])
    return {"rc": rc, "alarms": count.steps, "printed": err.getvalue().count("DGR collapse alarm")}


def test_two_data_parallel_ranks_warn_of_a_dgr_collapse_once(tmp_path):
    make_store(tmp_path / "pairs.zarr", 4)
    ranks = run_world(2, _train_with_an_alarm_at_step_1, str(tmp_path))
    assert [r["rc"] for r in ranks] == [0, 0]
    assert [r["alarms"] for r in ranks] == [["DGR collapse alarm at step 1"], []], ranks   # the writer, once
    assert [r["printed"] for r in ranks] == [1, 0], ranks

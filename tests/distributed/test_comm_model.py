"""The bytes each rank hands to collectives in one step equal the analytic model (comm_model.py),
collective by collective, for the 2-rank layouts (tools/bench_comm.py covers all of them)."""
import pytest

from megatron_regdpo.experiments.comm import run_layouts
from megatron_regdpo.parallel.spawn import run_world

pytestmark = pytest.mark.distributed
NAMES = ["TP2", "TP2+SP", "CP2", "PP2", "DP2-distopt", "I2V-TP2+SP"]


@pytest.fixture(scope="module")
def rows():
    return [row for rank_rows in run_world(2, run_layouts, NAMES) for row in rank_rows]


@pytest.mark.parametrize("name", NAMES)
def test_measured_bytes_equal_model(rows, name):
    mine = [r for r in rows if r["layout"] == name]
    assert len(mine) == 2
    for r in mine:
        assert r["measured"] == r["expected"], f"rank {r['rank']} {r['coords']}"
        assert r["measured_total"] > 0

"""training/startup.py without a run: the per-bucket epoch arithmetic, and which warnings the filters hide."""
from __future__ import annotations

import warnings

import pytest

from megatron_regdpo.data.sampler import PairSampler
from megatron_regdpo.training import startup

A, B, C = (16, 3, 8, 8), (16, 3, 8, 12), (16, 5, 8, 8)


def test_bucket_lines_count_what_one_epoch_trains():
    shapes = [A] * 5 + [B] * 4 + [C]
    drop = PairSampler(shapes, micro_batch=2, dp_rank=0, dp_size=2, small_buckets="drop")   # global batch 4
    assert startup.bucket_lines(drop) == [
        "  16x3x8x8: 5 pairs, 4 trained per epoch (1 batch)",
        "  16x3x8x12: 4 pairs, 4 trained per epoch (1 batch)",
        "  16x5x8x8: 1 pair, 0 trained per epoch (0 batches); smaller than one global batch: never trained",
    ]
    repeat = PairSampler(shapes, micro_batch=2, dp_rank=0, dp_size=2, small_buckets="repeat")
    assert startup.bucket_lines(repeat) == [
        "  16x3x8x8: 5 pairs, all 5 (+3 repeated) trained per epoch (2 batches)",
        "  16x3x8x12: 4 pairs, all 4 trained per epoch (1 batch)",
        "  16x5x8x8: 1 pair, all 1 (+3 repeated) trained per epoch (1 batch)",
    ]


def _shown(message: str, category, module: str) -> bool:
    """Whether the current filters let a warning with this message, attributed to `module`, through."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # as if nothing were filtered yet; then the filters under test
        startup.hide_known_warnings()
        warnings.warn_explicit(message, category, filename="x.py", lineno=1, module=module)
    return bool(seen)


def test_filters_match_message_and_module_only(monkeypatch):
    monkeypatch.delenv(startup.SHOW_ENV, raising=False)
    monkeypatch.setattr("sys.warnoptions", [])
    te = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
    assert not _shown(te, UserWarning, "megatron.core.optimizer")
    assert _shown(te, UserWarning, "megatron_regdpo.training.optimizer")         # our own code: never hidden
    assert _shown("something else", UserWarning, "megatron.core.optimizer")      # no UserWarning wholesale
    assert _shown(te, DeprecationWarning, "megatron.core.optimizer")             # nor another category
    monkeypatch.setenv(startup.SHOW_ENV, "1")
    assert _shown(te, UserWarning, "megatron.core.optimizer")


def test_one_line_says_what_is_hidden(monkeypatch, capsys):
    monkeypatch.delenv(startup.SHOW_ENV, raising=False)
    monkeypatch.setattr("sys.warnoptions", [])
    with warnings.catch_warnings():
        hidden = startup.hide_known_warnings()
    assert hidden == len(startup.HARMLESS) and capsys.readouterr().err == ""   # silent until the run starts
    startup.announce_hidden(hidden, rank=0)
    startup.announce_hidden(hidden, rank=3)   # other ranks stay quiet
    startup.announce_hidden(0, rank=0)        # nothing hidden: nothing to say
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"{hidden} kinds of known-harmless" in err[0] and startup.SHOW_ENV in err[0]


@pytest.mark.parametrize("entry", startup.HARMLESS, ids=lambda h: h.message[:30])
def test_every_entry_names_its_source_and_why(entry):
    assert entry.module.startswith(("megatron", "torch")) and len(entry.why) > 20
    assert not entry.module.startswith("megatron_regdpo")


def test_pytest_lines_cover_every_warning_entry():
    lines = startup.pytest_filterwarnings()
    assert len(lines) == sum(h.category is not None for h in startup.HARMLESS)
    assert all(line.count(":") == 3 for line in lines)

"""Fixtures of the data tests: small videos written here with PyAV (good, odd and broken) and tiny random
encoders saved to a folder (nothing is downloaded: HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    from megatron_regdpo.data.decode.synth import make_test_clips

    return make_test_clips(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    from megatron_regdpo.data.encode import tiny_models

    return tiny_models(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def encoders(tiny_paths):
    from megatron_regdpo.data.encode import load_encoders

    return load_encoders(tiny_paths, "i2v", text_len=64)

"""Shared fixtures: one single-process distributed setup per session, a fixed seed per test."""
from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    # megatron-core warns on import (and again per module) when neither TE nor Apex is present;
    # on CPU test machines that is expected and only drowns the real warnings.
    config.addinivalue_line("filterwarnings", "ignore:Transformer Engine and Apex are not installed:UserWarning")


@pytest.fixture(scope="session")
def pg():
    """Single-process gloo + Megatron parallel_state (tp=pp=cp=1); the ProcessGroupCollection."""
    from megatron_regdpo.parallel.groups import destroy_distributed, init_distributed

    collection = init_distributed()
    yield collection
    destroy_distributed()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

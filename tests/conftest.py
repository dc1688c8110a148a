from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from harness.bundle import Bundle, prepare_bundle
from harness.cache import Cache
from harness.task import TASKS


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path):
    # no test may touch a user's results or tracking server
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(tmp_path / "results"))
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Bundle:
    """The facts task at scale tiny, trained once per test session."""
    cache = Cache(tmp_path_factory.mktemp("cache"))
    logging.getLogger("harness").setLevel(logging.INFO)
    return prepare_bundle(TASKS.get("facts")(), "tiny", seed=0, cache=cache)


@pytest.fixture
def results_dir(tmp_path) -> Path:
    return tmp_path / "results"


@pytest.fixture(scope="session")
def tiny_owners_bundle(tmp_path_factory) -> Bundle:
    """The owners task at scale tiny, trained once per test session."""
    cache = Cache(tmp_path_factory.mktemp("owners-cache"))
    return prepare_bundle(TASKS.get("owners")(), "tiny", seed=0, cache=cache)

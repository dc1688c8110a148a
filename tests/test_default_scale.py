"""The main job at the default scale: what the README promises (slow; CI runs it separately)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from harness.cli import main

pytestmark = pytest.mark.slow


def test_default_scale_learns_the_facts_and_methods_beat_random(results_dir):
    result = CliRunner().invoke(
        main,
        ["--results-dir", str(results_dir), "run", "--method", "all", "--task", "facts"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output

    client = MlflowClient(tracking_uri=f"sqlite:///{results_dir.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("facts")
    runs = {r.data.tags["method"]: r for r in client.search_runs([experiment.experiment_id])}
    assert all(r.data.params["scale"] == "small" for r in runs.values())

    random_metrics = runs["random"].data.metrics
    assert random_metrics["learned_fraction"] >= 0.8
    for method in ("bm25", "grad_cos", "tracin"):
        metrics = runs[method].data.metrics
        # clearly above the floor: the two 95% intervals do not overlap
        assert metrics["mrr_ci_low"] > random_metrics["mrr_ci_high"], method

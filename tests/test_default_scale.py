"""The main job at the default scale: what the README promises (slow; CI runs it separately)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.method import METHODS

pytestmark = pytest.mark.slow


def test_default_scale_learns_the_facts_and_methods_beat_random(results_dir):
    # every method but datamodel, whose own pool takes half an hour here; a 3-model LDS
    # pool checks the counterfactual path at this scale (the README's figures use 30)
    methods = ",".join(name for name in METHODS.names() if name != "datamodel")
    result = CliRunner().invoke(
        main,
        ["--results-dir", str(results_dir), "run", "--method", methods, "--task", "facts",
         "--pool-models", "3", "--no-reliability"],
        catch_exceptions=False,
    )  # fmt: skip
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
    for run in runs.values():
        assert run.data.metrics["lds_models"] == 3
        assert -1.0 <= run.data.metrics["lds"] <= 1.0

"""Every registered method runs on every task it applies to (scale tiny)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.runner import parse_method_names


@pytest.mark.parametrize("task", ["canaries", "backdoor"])
def test_every_method_finishes_on_the_new_tasks(tmp_path, task):
    results = tmp_path / "results"
    result = CliRunner().invoke(
        main,
        ["--results-dir", str(results), "run", "--method", "all", "--task", task,
         "--scale", "tiny", "--no-lds", "--no-reliability", "--param", "datamodel.models=4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{results.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(task).experiment_id])
    assert sorted(r.data.tags["method"] for r in runs) == sorted(
        parse_method_names("all", task=task)
    )
    assert {r.info.status for r in runs} == {"FINISHED"}

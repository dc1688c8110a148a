"""Failure semantics: a failed method is recorded as FAILED and never ranked; others survive."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from harness.evaluation import Evaluation
from harness.leaderboard import build_leaderboard, collect_runs
from harness.method import Method
from harness.runner import Runner, RunPlan
from methods.baseline import RandomScores
from tasks.facts import FactsTask


class NaNScores(Method):  # no name keyword: kept out of the global registry
    name, family = "nan_scores", "baseline"

    def score(self, bundle, queries):
        scores = np.zeros((len(queries), len(bundle.data.documents)))
        scores[1, 3] = np.nan  # the second query: the error must name it, not the first
        return scores


def runner_bundle_queries(runner):
    """The learned queries of the tiny facts bundle the runner just used (from its cache)."""
    from harness.bundle import prepare_bundle

    return prepare_bundle(FactsTask(), "tiny", seed=0, cache=runner.cache).learned_queries


class Exploding(Method):
    name, family = "exploding", "baseline"

    def fit(self, bundle):
        raise RuntimeError("out of cheese")

    def score(self, bundle, queries):  # pragma: no cover - never reached
        raise AssertionError


class WrongShape(Method):
    name, family = "wrong_shape", "baseline"

    def score(self, bundle, queries):
        return np.zeros((len(queries), 2))


def test_failed_runs_are_marked_and_never_ranked(results_dir):
    runner = Runner(results_dir)
    plan = RunPlan(
        task=FactsTask(),
        scale="tiny",
        seed=0,
        methods=(RandomScores(), NaNScores(), Exploding(), WrongShape()),
        evaluation=Evaluation(lds=False, reliability=False),
    )
    outcomes = {o.method: o for o in runner.execute(plan)}

    assert outcomes["random"].status == "FINISHED"
    assert outcomes["nan_scores"].status == "FAILED"
    error = outcomes["nan_scores"].error
    assert "NaN or infinite scores for 1 of" in error and "score nan for document 3" in error
    learned = runner_bundle_queries(runner)
    assert f"the first is {learned[1].id!r}" in error
    assert outcomes["exploding"].error == "RuntimeError: out of cheese"
    assert "must return shape" in outcomes["wrong_shape"].error

    client = MlflowClient(tracking_uri=runner.tracker.uri)
    runs = client.search_runs([client.get_experiment_by_name("facts").experiment_id])
    status = {r.data.tags["method"]: (r.info.status, r.data.tags.get("error", "")) for r in runs}
    assert status["random"] == ("FINISHED", "")
    assert (
        status["nan_scores"][0] == "FAILED" and "ScoresNotFiniteError" in status["nan_scores"][1]
    )
    assert status["exploding"] == ("FAILED", "RuntimeError: out of cheese")
    failed_queries = {r.data.tags["method"]: r.data.metrics.get("failed_queries") for r in runs}
    assert failed_queries["nan_scores"] == 1 and failed_queries["random"] == 0
    exploding = next(r for r in runs if r.data.tags["method"] == "exploding")
    traceback_text = client.download_artifacts(exploding.info.run_id, "error.txt")
    assert "in fit" in Path(traceback_text).read_text()  # the traceback, not just the message

    board = build_leaderboard(collect_runs(runner.tracker.uri))
    assert board["method"].to_list() == ["random"]


class Interrupted(Method):
    name, family = "interrupted", "baseline"

    def score(self, bundle, queries):
        raise KeyboardInterrupt


def test_an_interrupt_stops_the_run_marks_it_failed_and_keeps_earlier_runs(results_dir):
    runner = Runner(results_dir)
    plan = RunPlan(
        task=FactsTask(),
        scale="tiny",
        seed=0,
        methods=(RandomScores(), Interrupted()),
        evaluation=Evaluation(lds=False, reliability=False),
    )
    with pytest.raises(KeyboardInterrupt):
        runner.execute(plan)
    client = MlflowClient(tracking_uri=runner.tracker.uri)
    runs = client.search_runs([client.get_experiment_by_name("facts").experiment_id])
    status = {r.data.tags["method"]: r.info.status for r in runs}
    assert status == {"random": "FINISHED", "interrupted": "FAILED"}
    assert build_leaderboard(collect_runs(runner.tracker.uri))["method"].to_list() == ["random"]

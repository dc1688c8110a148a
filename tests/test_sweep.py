"""Optuna sweeps: tracking, resume, failed trials, held-out evaluation, leaderboard, plots."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import optuna
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from harness.errors import ParameterError
from harness.evaluation import Evaluation
from harness.leaderboard import build_leaderboard, collect_runs, write_leaderboard
from harness.method import METHODS, Method
from harness.params import Params, param
from harness.plots import pareto_front, write_plots
from harness.splits import select_queries
from harness.sweep import SweepConflictError, SweepSpec, check_spec, open_storage, run_sweep
from tasks.facts import FactsTask


def _spec(results_dir, **changes) -> SweepSpec:
    spec = SweepSpec(
        method="bm25",
        task="facts",
        scale="tiny",
        seed=0,
        trials=3,
        objectives=("mrr",),
        sampler="random",
        timeout=None,
        storage=f"sqlite:///{results_dir.resolve()}/optuna.db",
        study_name="study",
        jobs=1,
        fixed={},
        results_dir=results_dir,
        tracking_uri=None,
        heldout_seeds=(0,),
        evaluation=Evaluation(lds=False, reliability=False),
    )
    return dataclasses.replace(spec, **changes)


def _runs(results_dir):
    client = MlflowClient(tracking_uri=f"sqlite:///{results_dir.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("facts")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def test_the_query_split_is_a_seeded_partition():
    data = FactsTask().build(FactsTask.scale("tiny").config, seed=0)
    tuning = select_queries(data.queries, "tuning", seed=0)
    heldout = select_queries(data.queries, "heldout", seed=0)
    assert {q.id for q in tuning} | {q.id for q in heldout} == {q.id for q in data.queries}
    assert not {q.id for q in tuning} & {q.id for q in heldout}
    assert len(tuning) == math.ceil(len(data.queries) / 2)
    assert tuning == select_queries(data.queries, "tuning", seed=0)
    assert tuning != select_queries(data.queries, "tuning", seed=1)


def test_a_sweep_tracks_nested_trials_then_scores_best_and_default_on_heldout_queries(
    results_dir,
):
    result = run_sweep(_spec(results_dir))
    assert result.complete == 3 and result.failed == 0

    study = optuna.load_study(study_name="study", storage=open_storage(_spec(results_dir).storage))
    assert study.user_attrs["mlflow_run_id"] == result.parent_run_id
    client, runs = _runs(results_dir)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["optuna.study_name"] == "study"
    assert parent.info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("harness.role") == "trial"]
    assert len(trials) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {result.parent_run_id}
    assert {r.data.tags["queries"] for r in trials} == {"tuning"}
    by_number = {int(r.data.tags["optuna.trial"]): r for r in trials}
    for trial in study.trials:
        assert trial.user_attrs["mlflow_run_id"] == by_number[trial.number].info.run_id
        assert float(by_number[trial.number].data.params["method.k1"]) == pytest.approx(
            trial.params["k1"]
        )

    # the held-out runs score only held-out queries, none of the tuning ones
    data = FactsTask().build(FactsTask.scale("tiny").config, seed=0)
    heldout_ids = {q.id for q in select_queries(data.queries, "heldout", seed=0)}
    selections = {}
    for selection, _, outcome in result.heldout:
        assert outcome.status == "FINISHED"
        folder = client.download_artifacts(outcome.run_id, "")
        scored = set(pl.read_csv(f"{folder}/per_query.csv")["query_id"].to_list())
        assert scored and scored <= heldout_ids
        selections[selection] = client.get_run(outcome.run_id)
    best_params = {k: str(v) for k, v in study.best_trial.params.items()}
    assert selections["best"].data.params["method.k1"] == best_params["k1"]
    assert selections["default"].data.params["method.k1"] == "1.5"  # BM25's default

    # the leaderboard holds the two held-out runs, never the trials or the study
    table = build_leaderboard(collect_runs(client.tracking_uri))
    assert sorted(table["selection"].to_list()) == ["best", "default"]
    assert set(table["queries"].to_list()) == {"heldout"}


def test_rerunning_resumes_the_study_and_a_changed_space_is_refused(results_dir):
    run_sweep(_spec(results_dir, trials=2))
    run_sweep(_spec(results_dir, trials=2))  # nothing missing: no new trial
    storage = open_storage(_spec(results_dir).storage)
    assert len(optuna.load_study(study_name="study", storage=storage).trials) == 2
    run_sweep(_spec(results_dir, trials=3))  # one missing
    trials = optuna.load_study(study_name="study", storage=storage).trials
    assert len(trials) == 3
    # the resumed sampler does not replay the first run's suggestions
    assert trials[2].params not in (trials[0].params, trials[1].params)
    _, runs = _runs(results_dir)
    assert sum(r.data.tags.get("harness.role") == "sweep" for r in runs) == 1  # one parent

    with pytest.raises(SweepConflictError, match=r"fixed parameters .* --study-name"):
        run_sweep(_spec(results_dir, fixed={"k1": "1.0"}))
    with pytest.raises(SweepConflictError, match="objectives"):
        run_sweep(_spec(results_dir, objectives=("auprc",)))
    run_sweep(_spec(results_dir, fixed={"k1": "1.0"}, study_name="other", trials=1))
    # a task variant is another study, in either direction, however its value is typed
    with pytest.raises(SweepConflictError, match=r"task settings \(stored: the preset; now: "):
        run_sweep(_spec(results_dir, task_params={"paraphrase": "yes"}))
    spec = _spec(results_dir, task_params={"min_statements": "3"}, study_name="variant")
    variant = optuna.create_study(study_name="variant", storage=storage)
    variant.set_user_attr("signature", spec.signature())
    with pytest.raises(SweepConflictError, match=r"stored: min_statements=3; now: the preset"):
        run_sweep(_spec(results_dir, study_name="variant"))
    assert (
        spec.signature()
        == _spec(
            results_dir, task_params={"min_statements": "03"}, study_name="variant"
        ).signature()
    )
    # the preset's own value is the preset
    assert (
        _spec(results_dir, task_params={"min_statements": "2"}).signature()
        == _spec(results_dir).signature()
    )


@dataclasses.dataclass(frozen=True)
class PoisonParams(Params):
    poison: bool = param(False, help="score with NaN")
    weight: float = param(1.0, help="scale of the scores", low=0.5, high=2.0)


class Poisonable(Method):
    """BM25-like scores, or NaN when ``poison`` is set: a trial that must fail."""

    name, family = "poisonable", "baseline"
    Params = PoisonParams

    def score(self, bundle, queries):
        if self.params.poison:
            return np.full((len(queries), len(bundle.data.documents)), np.nan)
        rng = np.random.default_rng(0)
        return self.params.weight * rng.random((len(queries), len(bundle.data.documents)))


def test_a_failing_trial_is_recorded_failed_with_its_reason_and_never_best(
    results_dir, monkeypatch
):
    METHODS.names()  # discover the built-ins before adding the test's method
    monkeypatch.setitem(METHODS._classes, "poisonable", Poisonable)
    result = run_sweep(_spec(results_dir, method="poisonable", trials=8))
    study = optuna.load_study(study_name="study", storage=open_storage(_spec(results_dir).storage))
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert failed and complete and result.failed == len(failed)
    assert all(t.params["poison"] for t in failed)
    assert all("NaN or infinite scores" in t.user_attrs["error"] for t in failed)
    assert study.best_trial.params["poison"] is False


def test_bad_sweep_settings_are_refused_before_any_work(results_dir):
    with pytest.raises(ParameterError, match="--trials must be at least 1"):
        check_spec(_spec(results_dir, trials=0))
    with pytest.raises(ParameterError, match="cannot share the SQLite storage"):
        check_spec(_spec(results_dir, jobs=2))
    with pytest.raises(ParameterError, match="not a storage URL"):
        check_spec(_spec(results_dir, storage="optuna.db"))
    with pytest.raises(ParameterError, match="nothing to tune"):
        check_spec(_spec(results_dir, method="random"))
    assert not (results_dir / "cache").exists()


def test_parallel_workers_share_a_journal_storage_without_extra_trials(results_dir):
    storage = f"journal:///{results_dir.resolve()}/optuna.journal"
    result = run_sweep(_spec(results_dir, jobs=2, trials=4, storage=storage))
    study = optuna.load_study(study_name="study", storage=open_storage(storage))
    assert len(study.trials) == 4 and result.complete == 4
    # each worker draws its own suggestions
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4


def test_the_leaderboard_csv_round_trips_at_full_precision_and_plots_are_written(results_dir):
    run_sweep(_spec(results_dir, trials=2))
    uri = f"sqlite:///{results_dir.resolve()}/mlflow.db"
    table = write_leaderboard(uri, results_dir / "leaderboard.csv")
    again = pl.read_csv(results_dir / "leaderboard.csv", schema=table.schema)
    assert again.equals(table)
    paths = write_plots(table, results_dir / "plots")
    assert [p.name for p in paths] == [
        "fidelity_vs_cost.png", "method_task_heatmap.png", "primary_metric_bars.png"
    ]  # fmt: skip
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    seconds = np.array([1.0, 2.0, 3.0, 0.5, 2.5])
    value = np.array([0.5, 0.7, 0.6, 0.1, 0.9])
    assert sorted(pareto_front(seconds, value).tolist()) == [0, 1, 3, 4]


@dataclasses.dataclass(frozen=True)
class RankParams(Params):
    rank: int = param(1, help="a rank the model may refuse", low=1, high=4)


class Refusing(Method):
    """Refuses ranks above 2 in ``check_model``, as a layer selection can be refused."""

    name, family = "refusing", "baseline"
    Params = RankParams

    def check_model(self, model, *, checkpoints):
        if self.params.rank > 2:
            raise ParameterError(f"rank={self.params.rank} exceeds what the model takes (2)")

    def score(self, bundle, queries):
        return np.random.default_rng(self.params.rank).random(
            (len(queries), len(bundle.data.documents))
        )


def test_a_trial_refused_before_any_work_is_a_failed_nested_run_with_its_reason(
    results_dir, monkeypatch
):
    METHODS.names()
    monkeypatch.setitem(METHODS._classes, "refusing", Refusing)
    run_sweep(_spec(results_dir, method="refusing", trials=6))
    study = optuna.load_study(study_name="study", storage=open_storage(_spec(results_dir).storage))
    refused = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert refused and all(t.params["rank"] > 2 for t in refused)
    _, runs = _runs(results_dir)
    failed_runs = {
        int(r.data.tags["optuna.trial"]): r
        for r in runs
        if r.data.tags.get("harness.role") == "trial" and r.info.status == "FAILED"
    }
    for trial in refused:
        run = failed_runs[trial.number]
        assert "exceeds what the model takes" in run.data.tags["error"]
        assert run.data.params["method.rank"] == str(trial.params["rank"])


def test_a_fidelity_cost_study_reports_its_pareto_front(results_dir):
    result = run_sweep(_spec(results_dir, objectives=("mrr", "cost"), trials=4))
    front = result.best
    assert front and all(set(entry["values"]) == {"mrr", "cost"} for entry in front)
    # no member of the front is beaten on both objectives by another trial
    study = optuna.load_study(study_name="study", storage=open_storage(_spec(results_dir).storage))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for entry in front:
        mrr, cost = entry["values"]["mrr"], entry["values"]["cost"]
        assert not any(
            t.values[0] >= mrr and t.values[1] <= cost and tuple(t.values) != (mrr, cost)
            for t in done
        )
    assert [e["values"]["mrr"] for e in front] == sorted(
        (e["values"]["mrr"] for e in front), reverse=True
    )  # best fidelity first: the member evaluated on held-out queries
    client, _ = _runs(results_dir)
    stored = client.download_artifacts(result.parent_run_id, "best_trials.json")
    assert len(json.loads(Path(stored).read_text())) == len(front)

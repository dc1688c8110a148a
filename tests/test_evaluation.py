"""LDS, reliability and removal as a run computes them, checked against references."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from harness.bundle import prepare_bundle
from harness.cache import Cache
from harness.evaluation import Evaluation, reliability_metrics, removal_metrics
from harness.executor import InlineExecutor
from harness.retrain import build_pool
from harness.runner import Runner, RunPlan
from methods.baseline import RandomScores
from methods.bm25 import BM25
from methods.gradient import GradDot
from tasks.facts import FactsTask


def test_a_run_logs_lds_equal_to_a_brute_force_spearman_over_the_pool(results_dir):
    runner = Runner(results_dir)
    plan = RunPlan(
        task=FactsTask(),
        scale="tiny",
        seed=0,
        methods=(GradDot(), RandomScores()),
        evaluation=Evaluation(pool_models=4, reliability=False),
    )
    outcomes = {o.method: o for o in runner.execute(plan)}
    assert {o.status for o in outcomes.values()} == {"FINISHED"}

    bundle = prepare_bundle(FactsTask(), "tiny", seed=0, cache=runner.cache)
    queries = bundle.learned_queries
    pool = build_pool(bundle, "lds", models=4, fraction=0.5, executor=InlineExecutor())
    client = MlflowClient(tracking_uri=runner.tracker.uri)
    for name, outcome in outcomes.items():
        scores = np.load(client.download_artifacts(outcome.run_id, "scores.npy"))
        expected = []
        for q, query in enumerate(queries):
            column = pool.query_ids.index(query.id)
            summed = [scores[q, pool.masks[m]].sum() for m in range(len(pool))]
            rho = stats.spearmanr(summed, pool.logprobs[:, column]).statistic
            expected.append(0.0 if np.isnan(rho) else rho)
        assert outcome.metrics["lds"] == pytest.approx(np.mean(expected), abs=1e-5), name
        assert outcome.metrics["lds_models"] == 4


def test_reliability_separates_deterministic_random_and_model_free_methods(tiny_bundle, tmp_path):
    bundle = dataclasses.replace(tiny_bundle, cache=Cache(tmp_path / "cache"))
    queries = bundle.learned_queries

    def measured(method):
        method.fit(bundle)
        scores = method.score(bundle, queries)
        return reliability_metrics(method, bundle, queries, np.asarray(scores, dtype=float))

    grad_dot, grad_dot_tags = measured(GradDot())
    assert grad_dot["seed_stability"] == pytest.approx(1.0)  # no randomness in grad_dot
    assert grad_dot["randomization_correlation"] < 0.9  # it reads the trained weights
    assert grad_dot_tags == {"model_independent": "false"}
    assert -1.0 <= grad_dot["model_seed_stability"] <= 1.0

    random, random_tags = measured(RandomScores())
    assert abs(random["seed_stability"]) < 0.2  # another seed, other scores
    assert random_tags == {"model_independent": "true"}  # it ignores the model

    bm25, bm25_tags = measured(BM25())
    assert bm25["randomization_correlation"] == pytest.approx(1.0)
    assert bm25["model_seed_stability"] == pytest.approx(1.0)
    assert bm25_tags == {"model_independent": "true"}


def test_randomized_weights_differ_from_the_trained_ones_and_are_seeded(tiny_bundle):
    first, again = tiny_bundle.randomized(0), tiny_bundle.randomized(0)
    other = tiny_bundle.randomized(1)
    name = "blocks.0.attention.qkv.weight"
    trained = tiny_bundle.checkpoints[-1].state[name]
    assert not np.allclose(first.checkpoints[-1].state[name], trained)
    np.testing.assert_array_equal(
        first.checkpoints[0].state[name], again.checkpoints[0].state[name]
    )
    assert not np.allclose(first.checkpoints[0].state[name], other.checkpoints[0].state[name])
    assert len({first.model_key, other.model_key, tiny_bundle.model_key}) == 3
    assert first.setup_key == tiny_bundle.setup_key  # retrain pools are shared


def test_removing_the_documents_that_state_a_fact_costs_more_than_removing_random_ones(
    tiny_bundle, tmp_path, caplog
):
    bundle = dataclasses.replace(tiny_bundle, cache=Cache(tmp_path / "cache"))
    queries = bundle.learned_queries
    # an oracle: the documents that state each queried fact score 1, the rest 0
    index = {doc_id: i for i, doc_id in enumerate(bundle.data.document_ids)}
    oracle = np.zeros((len(queries), len(bundle.data.documents)))
    for q, query in enumerate(queries):
        oracle[q, [index[d] for d in query.relevant]] = 1.0
    evaluation = Evaluation(removal=True, removal_queries=2, removal_ks=(5,))
    metrics = removal_metrics(bundle, queries, oracle, evaluation)
    assert metrics["removal_queries"] == 2
    assert metrics["removal_effect_at_5"] == pytest.approx(
        metrics["removal_drop_at_5"] - metrics["removal_random_drop_at_5"]
    )
    # without the statements the fact cannot be learned: a clearly larger drop
    assert metrics["removal_drop_at_5"] > metrics["removal_random_drop_at_5"] + 0.5

    caplog.clear()
    with caplog.at_level("INFO"):
        again = removal_metrics(bundle, queries, oracle, evaluation)
    assert again == metrics and "retrains on all but k documents" not in caplog.text  # cached


def test_replicas_of_derived_bundles_are_new_models_of_the_same_kind(tiny_bundle, tmp_path):
    import torch

    bundle = dataclasses.replace(tiny_bundle, cache=Cache(tmp_path / "cache"))
    name = "blocks.0.attention.qkv.weight"
    second = bundle.replica(1).replica(1)  # numbering continues: the reference's replica 2
    assert second.replica_index == 2 and second.model_key == bundle.replica(2).model_key
    assert not torch.equal(
        second.checkpoints[-1].state[name], bundle.replica(1).checkpoints[-1].state[name]
    )

    state = torch.get_rng_state()
    randomized = bundle.randomized(0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    member = randomized.replica(1)  # a randomised bundle's replica is randomised too
    assert member.randomization == 0 and member.model_key != randomized.model_key
    trained_replica = bundle.replica(1).checkpoints[-1].state[name]
    for weights in (member.checkpoints[-1].state[name], randomized.checkpoints[-1].state[name]):
        assert not torch.equal(weights, trained_replica)
    assert not torch.equal(
        member.checkpoints[0].state[name], randomized.checkpoints[0].state[name]
    )

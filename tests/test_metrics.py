"""Fidelity metrics on cases small enough to work out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from harness.metrics import mean_with_ci, query_metrics, summarize


def test_hand_computed_ranking_metrics():
    # ranking of query 0: d3, d1, d0, d2, d4 -> relevant d1 (rank 2) and d2 (rank 4)
    scores = np.array([[0.3, 0.8, 0.1, 0.9, -1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    metrics = query_metrics(scores, [[1, 2], [4]], ks=(1, 2, 4))
    np.testing.assert_allclose(metrics["reciprocal_rank"], [1 / 2, 1 / 5])
    # AP = mean of precision at each relevant hit: (1/2 + 2/4) / 2 and 1/5
    np.testing.assert_allclose(metrics["average_precision"], [0.5, 0.2])
    np.testing.assert_allclose(metrics["recall_at_1"], [0.0, 0.0])
    np.testing.assert_allclose(metrics["recall_at_2"], [0.5, 0.0])
    np.testing.assert_allclose(metrics["recall_at_4"], [1.0, 0.0])
    np.testing.assert_array_equal(metrics["first_relevant_rank"], [2, 5])


def test_perfect_scores_give_one():
    scores = np.eye(4)
    metrics = query_metrics(scores, [[0], [1], [2], [3]], ks=(1,))
    assert metrics["reciprocal_rank"].tolist() == [1.0] * 4
    assert metrics["average_precision"].tolist() == [1.0] * 4


def test_ties_are_broken_at_random_not_in_favour_of_the_method():
    # constant scores: the relevant document's expected reciprocal rank is H(n)/n
    n = 50
    scores = np.zeros((2000, n))
    metrics = query_metrics(scores, [[0]] * 2000, ks=(1,), seed=3)
    expected = sum(1 / r for r in range(1, n + 1)) / n
    assert metrics["reciprocal_rank"].mean() == pytest.approx(expected, rel=0.1)
    assert metrics["reciprocal_rank"].mean() < 0.2  # index order would have given 1.0


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_queries():
    rng = np.random.default_rng(0)
    few, many = rng.random(20), rng.random(2000)
    mean, low, high = mean_with_ci(few)
    assert low < mean < high
    _, low_many, high_many = mean_with_ci(many)
    assert high_many - low_many < (high - low) / 3
    # for a uniform variable the standard error of the mean is sqrt(1/12 / n)
    assert high_many - low_many == pytest.approx(2 * 1.96 * np.sqrt(1 / 12 / 2000), rel=0.15)


def test_constant_or_single_values_have_a_degenerate_interval():
    assert mean_with_ci(np.array([0.25])) == (0.25, 0.25, 0.25)
    assert mean_with_ci(np.array([1.0, 1.0, 1.0])) == (1.0, 1.0, 1.0)


def test_summary_names():
    metrics = query_metrics(np.eye(3), [[0], [1], [2]])
    summary = summarize(metrics)
    assert summary["mrr"] == 1.0 and summary["auprc"] == 1.0 and summary["recall_at_50"] == 1.0
    assert {"mrr_ci_low", "mrr_ci_high", "recall_at_10", "auprc_ci_high"} <= summary.keys()


def test_bad_shapes_and_empty_ground_truth_are_rejected():
    with pytest.raises(ValueError, match="scores must be"):
        query_metrics(np.zeros((2, 3)), [[0]])
    with pytest.raises(ValueError, match="at least one relevant"):
        query_metrics(np.zeros((1, 3)), [[]])

"""LDS and rank correlations against closed-form cases and a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from harness.metrics import lds_per_query, rank_correlations


def test_rank_correlations_equal_scipy_spearman_row_by_row_with_ties():
    rng = np.random.default_rng(0)
    first = rng.integers(0, 5, size=(20, 30)).astype(float)  # many ties
    second = first + rng.normal(scale=2.0, size=first.shape)
    expected = [stats.spearmanr(a, b).statistic for a, b in zip(first, second, strict=True)]
    np.testing.assert_allclose(rank_correlations(first, second), expected, atol=1e-12)


def test_a_constant_row_has_correlation_zero_not_nan():
    first = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    second = np.array([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(rank_correlations(first, second), [0.0, 1.0])


def _linear_world(n_models=200, n_documents=40, n_queries=30, seed=0):
    """A "model" whose target log-probability is exactly linear in the documents it kept."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n_models, n_documents)) < 0.5
    true_scores = rng.normal(size=(n_queries, n_documents))
    targets = masks.astype(float) @ true_scores.T + 3.0  # (models, queries)
    return masks, true_scores, targets


def test_true_attributions_of_a_linear_model_have_lds_one():
    masks, true_scores, targets = _linear_world()
    np.testing.assert_allclose(lds_per_query(true_scores, masks, targets), 1.0)
    # LDS is rank-based: any increasing transform of the targets keeps it at 1
    np.testing.assert_allclose(lds_per_query(true_scores, masks, np.exp(targets / 10)), 1.0)


def test_random_scores_have_lds_near_zero_and_negated_scores_minus_one():
    masks, true_scores, targets = _linear_world()
    random = np.random.default_rng(1).normal(size=true_scores.shape)
    lds = lds_per_query(random, masks, targets)
    # a random score vector's LDS is about its cosine with the true one: mean 0 and a
    # spread of 1/√40 per query, so the mean over 30 queries is within ±0.1 of 0
    assert abs(lds.mean()) < 0.1
    assert lds.std() < 0.3
    np.testing.assert_allclose(lds_per_query(-true_scores, masks, targets), -1.0)


def test_lds_falls_as_attributions_get_noisier():
    masks, true_scores, targets = _linear_world()
    rng = np.random.default_rng(2)
    means = [
        lds_per_query(
            true_scores + rng.normal(scale=s, size=true_scores.shape), masks, targets
        ).mean()
        for s in (0.0, 0.5, 2.0, 8.0)
    ]
    assert means == sorted(means, reverse=True) and means[0] == pytest.approx(1.0)


def test_mismatched_shapes_are_refused():
    masks, true_scores, targets = _linear_world()
    with pytest.raises(ValueError, match="LDS needs scores"):
        lds_per_query(true_scores[:, :-1], masks, targets)

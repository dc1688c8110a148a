"""The contract every registered method must keep, checked on the tiny facts task."""

from __future__ import annotations

import numpy as np
import pytest

from harness.method import METHODS


def _scores(name, bundle, queries, *, seed=0):
    method = METHODS.get(name)(seed=seed)
    method.fit(bundle)
    return method.score(bundle, queries)


@pytest.fixture(params=METHODS.names())
def method_name(request):
    return request.param


def test_scores_are_finite_queries_by_documents(method_name, tiny_bundle):
    queries = tiny_bundle.learned_queries
    scores = np.asarray(_scores(method_name, tiny_bundle, queries))
    assert scores.shape == (len(queries), len(tiny_bundle.data.documents))
    assert np.isfinite(scores).all()


def test_same_seed_gives_the_same_scores(method_name, tiny_bundle):
    queries = tiny_bundle.learned_queries
    np.testing.assert_array_equal(
        _scores(method_name, tiny_bundle, queries), _scores(method_name, tiny_bundle, queries)
    )


def test_a_query_row_does_not_depend_on_the_other_queries(method_name, tiny_bundle):
    queries = tiny_bundle.learned_queries
    if METHODS.get(method_name).family == "baseline":
        pytest.skip("random scores are drawn per call, row by row in call order")
    full = _scores(method_name, tiny_bundle, queries)
    reversed_rows = _scores(method_name, tiny_bundle, queries[::-1])
    # float32 sums in another order: equal to rounding, not bit for bit; rounding is
    # relative to the scores' scale (a kernel's inverse amplifies it in near-zero scores)
    scale = np.abs(full).max()
    np.testing.assert_allclose(reversed_rows[::-1], full, rtol=1e-4, atol=1e-4 * scale)

"""Datamodels recover planted linear coefficients; their pool never meets the LDS pool."""

from __future__ import annotations

import numpy as np
import pytest

from harness.evaluation import lds_metrics
from harness.retrain import PURPOSES, SubsetPool, ensure_disjoint, retrain_seed
from methods.datamodel import Datamodel, fit_datamodels


def _planted(n_models, n_documents=30, n_queries=5, *, sparse=False, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    masks = (rng.random((n_models, n_documents)) < 0.5).astype(float)
    coefficients = rng.normal(size=(n_queries, n_documents))
    if sparse:
        coefficients[:, 5:] = 0.0
    targets = masks @ coefficients.T - 7.0 + rng.normal(scale=noise, size=(n_models, n_queries))
    return masks, coefficients, targets


def test_ridge_recovers_planted_coefficients():
    masks, coefficients, targets = _planted(400)
    fitted = fit_datamodels(masks, targets, estimator="ridge", strength=1e-4)
    np.testing.assert_allclose(fitted, coefficients, atol=0.02)


def test_lasso_recovers_a_sparse_support():
    masks, coefficients, targets = _planted(300, sparse=True)
    fitted = fit_datamodels(masks, targets, estimator="lasso", strength=1e-3)
    np.testing.assert_allclose(fitted[:, :5], coefficients[:, :5], atol=0.05)
    assert np.abs(fitted[:, 5:]).max() < 0.02


def test_stronger_ridge_shrinks_towards_zero_but_keeps_the_ranking_with_enough_models():
    masks, coefficients, targets = _planted(400)
    weak = fit_datamodels(masks, targets, estimator="ridge", strength=1e-4)
    strong = fit_datamodels(masks, targets, estimator="ridge", strength=10.0)
    assert np.abs(strong).sum() < np.abs(weak).sum()
    for row_strong, row_true in zip(strong, coefficients, strict=True):
        assert np.corrcoef(row_strong, row_true)[0, 1] > 0.9


def test_uninformative_columns_and_constant_targets_get_zero():
    masks, _, targets = _planted(100)
    masks[:, 0] = 1.0  # every model kept document 0
    targets[:, 1] = -2.0  # query 1 never varies
    fitted = fit_datamodels(masks, targets, estimator="ridge", strength=0.1)
    assert np.all(fitted[:, 0] == 0.0) and np.all(fitted[1] == 0.0)
    assert np.isfinite(fitted).all()


def test_seeds_of_different_purposes_never_coincide():
    seeds = {
        purpose: {
            retrain_seed(purpose, task_seed, i) for task_seed in range(3) for i in range(5000)
        }
        for purpose in PURPOSES
    }
    assert len(seeds["lds"]) == len(seeds["datamodel"]) == 15000
    assert not seeds["lds"] & seeds["datamodel"]


def _pool(purpose, seeds, n_documents=6, query_ids=("q0",)):
    rng = np.random.default_rng(0)
    return SubsetPool(
        purpose=purpose,
        fraction=0.5,
        key=f"{purpose}-pool",
        seeds=np.array(seeds),
        masks=rng.random((len(seeds), n_documents)) < 0.5,
        logprobs=rng.normal(size=(len(seeds), len(query_ids))),
        query_ids=query_ids,
        heldout_losses=np.zeros(len(seeds)),
    )


def test_a_datamodel_is_never_scored_against_the_pool_it_learned_from():
    lds_pool = _pool("lds", [10, 12, 14, 16])
    ensure_disjoint(_pool("datamodel", [11, 13, 15]), lds_pool)  # disjoint: fine
    with pytest.raises(ValueError, match="share 1 retrained models"):
        ensure_disjoint(_pool("datamodel", [11, 14]), lds_pool)

    method = Datamodel()
    method.pool = lds_pool  # as if it had been fitted on the evaluation pool itself

    class _Query:
        id = "q0"

    with pytest.raises(ValueError, match="must be evaluated on other retrains"):
        lds_metrics(method, np.zeros((1, 6)), [_Query()], lds_pool, seed=0)

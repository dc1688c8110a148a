"""TRAK's ensemble and out-to-loss weighting, and the independently trained replicas it uses."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from harness.cache import Cache
from harness.model import sequence_losses
from methods.trak import TRAK, TRAKParams


@pytest.fixture(scope="module")
def bundle(tiny_bundle, tmp_path_factory):
    return dataclasses.replace(tiny_bundle, cache=Cache(tmp_path_factory.mktemp("trak-cache")))


def _trak(bundle, queries, **overrides):
    params = TRAKParams(projection_dim=64, last_checkpoints=1, **overrides)
    return TRAK(params, seed=0).score(bundle, queries)


def test_a_replica_is_another_model_on_the_same_data_and_is_cached(bundle, caplog):
    caplog.set_level(logging.INFO, logger="harness.bundle")
    replica = bundle.replica(1)
    assert replica.model_key != bundle.model_key and replica.data is bundle.data
    reference, other = bundle.checkpoints[-1].state, replica.checkpoints[-1].state
    assert not torch.equal(reference["token_embedding.weight"], other["token_embedding.weight"])
    assert bundle.replica(1).model_key == replica.model_key
    assert "found existing replica 1" in caplog.text
    assert bundle.replica(0) is bundle


def test_the_ensemble_is_the_mean_of_its_members(bundle):
    queries = bundle.learned_queries[:4]
    ensemble = _trak(bundle, queries, models=2, out_to_loss=False)
    members = [_trak(bundle.replica(i), queries, out_to_loss=False) for i in (0, 1)]
    np.testing.assert_allclose(ensemble, (members[0] + members[1]) / 2, rtol=1e-6, atol=1e-9)


def test_out_to_loss_weights_each_document_by_one_minus_its_token_likelihood(bundle):
    queries = bundle.learned_queries[:4]
    plain = _trak(bundle, queries, out_to_loss=False)
    weighted = _trak(bundle, queries, out_to_loss=True)
    documents = bundle.documents
    with torch.no_grad():
        losses = sequence_losses(
            bundle.model()(documents.inputs), documents.targets, documents.loss_mask
        )
    weights = 1 - torch.exp(-losses.double() / documents.loss_mask.sum(dim=1)).numpy()
    np.testing.assert_allclose(weighted, plain * weights[None, :], rtol=1e-4, atol=1e-9)

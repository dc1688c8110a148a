"""Score orientation, pinned per method: larger means the document pushes the target up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.features import FeatureSpec, Featurizer, TrainFeatures, feature_products
from harness.method import METHODS
from harness.model import sequence_losses
from methods.gradient import FeatureParams, GradCos, GradDot, TracIn, TracInParams

GRADIENT_METHODS = [name for name in METHODS.names() if METHODS.get(name).family == "gradient"]


def _query_loss(model, queries):
    return sequence_losses(model(queries.inputs), queries.targets, queries.loss_mask)


def test_a_step_on_the_top_document_lowers_the_query_loss(tiny_bundle):
    """First-order check of grad_dot's sign: descend on one document, watch the query loss."""
    query = tiny_bundle.learned_queries[0]
    scores = GradDot().score(tiny_bundle, [query])[0]
    queries = tiny_bundle.encode_queries([query])
    before = _query_loss(tiny_bundle.model(), queries).item()
    changes = {}
    for name, index in (("top", int(np.argmax(scores))), ("bottom", int(np.argmin(scores)))):
        model = tiny_bundle.model()
        document = tiny_bundle.documents[index : index + 1]
        loss = sequence_losses(model(document.inputs), document.targets, document.loss_mask).sum()
        loss.backward()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter -= 1e-4 * parameter.grad
        changes[name] = _query_loss(model, queries).item() - before
    assert scores.max() > 0 > scores.min()
    assert changes["top"] < 0 < changes["bottom"]


def test_cosine_is_the_normalised_product(tiny_bundle):
    queries = tiny_bundle.learned_queries[:3]
    dot = GradDot().score(tiny_bundle, queries)
    cos = GradCos().score(tiny_bundle, queries)
    assert np.all(np.sign(dot) == np.sign(cos))
    assert np.all(np.abs(cos) <= 1 + 1e-6)


def test_tracin_sums_learning_rate_weighted_products_over_checkpoints(tiny_bundle):
    queries = tiny_bundle.learned_queries[:3]
    last = TracIn(TracInParams(last_checkpoints=1)).score(tiny_bundle, queries)
    final_rate = tiny_bundle.checkpoints[-1].learning_rate
    np.testing.assert_allclose(
        last, final_rate * GradDot(FeatureParams()).score(tiny_bundle, queries), rtol=1e-6
    )
    # all checkpoints: Σ_c η_c ∇ℓ_c(q)ᵀ∇ℓ_c(d), each product computed on its own
    query_sequences = tiny_bundle.encode_queries(queries)
    expected = sum(
        checkpoint.learning_rate
        * _products(tiny_bundle.model(c), query_sequences, tiny_bundle.documents).double()
        for c, checkpoint in enumerate(tiny_bundle.checkpoints)
    )
    assert len(tiny_bundle.checkpoints) == 3
    rates = [c.learning_rate for c in tiny_bundle.checkpoints]
    assert len(set(rates)) == 3  # distinct weights, so a wrong weighting would show
    np.testing.assert_allclose(TracIn().score(tiny_bundle, queries), expected.numpy(), rtol=1e-5)


def _products(model, queries, documents):
    featurizer = Featurizer(model, FeatureSpec())
    features = TrainFeatures(featurizer, documents, store=None, key_parts={})
    return feature_products(featurizer.matrix(queries), features)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_documents_stating_the_fact_score_above_the_rest(name, tiny_bundle):
    """The sign convention, pinned by planted truth: a flipped method scores them below.

    Per learned query, the gap between the mean standardised score of the
    documents that state its fact and of all others; averaged over queries.
    """
    queries = tiny_bundle.learned_queries
    method = METHODS.get(name)(seed=0)
    method.fit(tiny_bundle)
    scores = method.score(tiny_bundle, queries)
    ids = np.array(tiny_bundle.data.document_ids)
    gaps = []
    for row, query in zip(scores, queries, strict=True):
        relevant = np.isin(ids, query.relevant)
        standardised = (row - row.mean()) / row.std()
        gaps.append(standardised[relevant].mean() - standardised[~relevant].mean())
    assert np.mean(gaps) > 0.15

"""Score orientation, pinned per method: larger means the document pushes the target up."""

from __future__ import annotations

import numpy as np
import torch

from harness.gradients import gradient_products
from harness.model import sequence_losses
from methods.gradient import GradCos, GradDot, GradientParams, TracIn, TracInParams


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
        last, final_rate * GradDot(GradientParams()).score(tiny_bundle, queries), rtol=1e-6
    )
    # all checkpoints: Σ_c η_c ∇ℓ_c(q)ᵀ∇ℓ_c(d), each product computed on its own
    query_sequences = tiny_bundle.encode_queries(queries)
    expected = sum(
        checkpoint.learning_rate
        * gradient_products(tiny_bundle.model(c), query_sequences, tiny_bundle.documents).double()
        for c, checkpoint in enumerate(tiny_bundle.checkpoints)
    )
    assert len(tiny_bundle.checkpoints) == 3
    rates = [c.learning_rate for c in tiny_bundle.checkpoints]
    assert len(set(rates)) == 3  # distinct weights, so a wrong weighting would show
    np.testing.assert_allclose(TracIn().score(tiny_bundle, queries), expected.numpy(), rtol=1e-5)

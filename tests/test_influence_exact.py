"""Influence methods against dense exact references on a model of a few hundred parameters.

Each method's linear algebra is compared with the matrix it approximates, built
densely from per-example gradients taken by a plain loop, in the cases where
the approximation is exact: a projection that loses nothing (orthogonal, full
dimension), a single training document for DataInf, a Fisher that is truly a
Kronecker product for K-FAC and EK-FAC.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.curvature import KroneckerCurvature
from harness.data import encode_completions, encode_documents
from harness.features import FeatureSpec, Featurizer, TrainFeatures
from harness.gradients import GradientEngine, select_linear_modules
from harness.model import GPT, GPTConfig, sequence_losses
from harness.projection import DenseProjection, KroneckerProjection
from harness.tokenizer import WordTokenizer
from methods.influence import datainf_scores, logra_scores
from methods.trak import kernel_scores

TEXTS = [
    "ada lives in oslo .",
    "ada lives in oslo and sings .",
    "bob lives in rome .",
    "bob reads in rome .",
    "cy sings and reads .",
    "the cat reads .",
]


@pytest.fixture(scope="module")
def tiny():
    """A 1-block GPT of width 4 (a few hundred parameters), trained a little, full batch."""
    tokenizer = WordTokenizer.fit(TEXTS, min_count=1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(tokenizer), context=12, depth=1, width=4, heads=1))
    documents = encode_documents(TEXTS, tokenizer, context=12)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        loss = sequence_losses(model(documents.inputs), documents.targets, documents.loss_mask)
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
    queries = encode_completions(
        ["ada lives in", "bob lives in", "cy"], ["oslo", "rome", "sings"], tokenizer, context=12
    )
    return model.eval(), documents, queries


def _orthogonal(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q.float()


def _gradients(model, sequences, layers="*") -> torch.Tensor:
    """Per-example gradients by a plain autograd loop, float64."""
    parameters = [p for _, p in GradientEngine(model, layers=layers).parameters]
    rows = []
    for i in range(len(sequences)):
        n = int(sequences.loss_mask[i].nonzero().max()) + 1
        loss = sequence_losses(
            model(sequences.inputs[i : i + 1, :n]),
            sequences.targets[i : i + 1, :n],
            sequences.loss_mask[i : i + 1, :n],
        ).sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)]))
    return torch.stack(rows).double()


def _damped_solve(curvature: torch.Tensor, damping: float, rhs: torch.Tensor) -> torch.Tensor:
    """(C + λI)⁻¹ rhs with λ = damping × mean eigenvalue, by a dense solve."""
    size = curvature.shape[0]
    identity = torch.eye(size, dtype=torch.float64)
    shift = damping * torch.trace(curvature) / size
    return torch.linalg.solve(curvature + shift * identity, rhs)


def test_trak_with_a_lossless_projection_is_the_exact_damped_kernel(tiny):
    model, documents, queries = tiny
    g_docs, g_queries = _gradients(model, documents), _gradients(model, queries)
    plain = Featurizer(model, FeatureSpec())
    assert 200 < plain.size < 1000
    projection = DenseProjection.from_matrix(plain.blocks, _orthogonal(plain.size, seed=2))
    featurizer = Featurizer(
        model, FeatureSpec(projection="gaussian", dim=plain.size), projection=projection
    )
    features = TrainFeatures(featurizer, documents, store=None, key_parts={})
    (query_features,) = featurizer.matrix(queries)
    scores = kernel_scores(query_features, features, damping=0.05)
    expected = g_queries @ _damped_solve(g_docs.T @ g_docs, 0.05, g_docs.T)
    torch.testing.assert_close(scores.double(), expected, rtol=2e-3, atol=1e-4)


def test_logra_with_lossless_factors_is_exact_per_layer_fisher_influence(tiny):
    model, documents, queries = tiny
    modules = select_linear_modules(model, "blocks.*")
    factors = {
        name: (
            _orthogonal(module.in_features + 1, seed=10 + i),
            _orthogonal(module.out_features, seed=20 + i),
        )
        for i, (name, module) in enumerate(modules)
    }
    projection = KroneckerProjection(modules, 1, kind="gaussian", seed=0, factors=factors)
    spec = FeatureSpec(layers="blocks.*", projection="kronecker", dim=1)
    featurizer = Featurizer(model, spec, projection=projection)
    features = TrainFeatures(featurizer, documents, store=None, key_parts={})
    scores = logra_scores(featurizer.matrix(queries), features, damping=0.1)

    expected = torch.zeros(len(queries), len(documents), dtype=torch.float64)
    for name, module in modules:
        layer = f"{name}.weight,{name}.bias"
        g_docs, g_queries = (
            _affine(_gradients(model, s, layer), module) for s in (documents, queries)
        )
        fisher = g_docs.T @ g_docs / len(documents)
        expected += g_queries @ _damped_solve(fisher, 0.1, g_docs.T)
    torch.testing.assert_close(scores.double(), expected, rtol=2e-3, atol=1e-4)


def _affine(gradients: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    """[weight | bias] per example, flattened row-major as (out, in + 1)."""
    out, inputs = module.out_features, module.in_features
    weight = gradients[:, : out * inputs].view(-1, out, inputs)
    bias = gradients[:, out * inputs :].view(-1, out, 1)
    return torch.cat([weight, bias], dim=2).flatten(1)


@pytest.mark.parametrize("n_documents", [1, 6])
def test_datainf_is_its_closed_form_and_exact_for_one_document(tiny, n_documents):
    model, documents, queries = tiny
    documents = documents[:n_documents]
    layers = "blocks.0.mlp.*"
    featurizer = Featurizer(model, FeatureSpec(layers=layers))
    features = TrainFeatures(featurizer, documents, store=None, key_parts={})
    scores = datainf_scores(featurizer.matrix(queries), features, damping=0.1)

    g_docs, g_queries = _gradients(model, documents, layers), _gradients(model, queries, layers)
    expected = torch.zeros(len(queries), n_documents, dtype=torch.float64)
    start = 0
    for block in featurizer.blocks:
        d, q = g_docs[:, start : start + block.size], g_queries[:, start : start + block.size]
        start += block.size
        damping = 0.1 * d.square().sum(dim=1).mean() / block.size
        identity = torch.eye(block.size, dtype=torch.float64)
        # DataInf's definition: the mean of per-document damped inverses, each inverted densely
        inverse = sum(torch.linalg.inv(damping * identity + torch.outer(g, g)) for g in d)
        expected += q @ (inverse / n_documents) @ d.T
        if n_documents == 1:  # then it is the exact inverse of the damped empirical Fisher
            exact = torch.linalg.inv(damping * identity + d.T @ d)
            torch.testing.assert_close(inverse, exact)
    torch.testing.assert_close(scores.double(), expected, rtol=2e-3, atol=1e-4)


def _kronecker_case(inputs: torch.Tensor, output_grads: torch.Tensor):
    """One linear layer, one token per example; returns the fitted curvature and exact Fisher."""
    layer = nn.Linear(inputs.shape[-1], output_grads.shape[-1])
    curvature = KroneckerCurvature("layer", layer)
    a, e = inputs[:, None, :], output_grads[:, None, :]
    mask = torch.ones(len(inputs), 1)
    curvature.add_factors(a, e, mask)
    curvature.eigendecompose()
    curvature.add_correction(a, e)
    augmented = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1).double()
    per_example = torch.einsum("no,ni->noi", output_grads.double(), augmented).flatten(1)
    fisher = per_example.T @ per_example / len(inputs)
    return curvature, fisher


def test_ekfac_equals_kfac_equals_the_exact_fisher_inverse_when_the_fisher_is_kronecker():
    torch.manual_seed(0)
    # every input paired with every output gradient: E[a aᵀ ⊗ e eᵀ] = E[a aᵀ] ⊗ E[e eᵀ] exactly
    inputs_set, grads_set = torch.randn(5, 3), torch.randn(4, 2)
    inputs = inputs_set.repeat_interleave(len(grads_set), dim=0)
    output_grads = grads_set.repeat(len(inputs_set), 1)
    curvature, fisher = _kronecker_case(inputs, output_grads)
    gradients = torch.randn(7, 2, 4, dtype=torch.float64)  # (n, out, in + 1)
    damping = 0.3
    exact = torch.linalg.solve(
        fisher + damping * torch.eye(8, dtype=torch.float64), gradients.flatten(1).T
    ).T
    for kind in ("ekfac", "kfac"):
        result = curvature.precondition(gradients, damping=damping, kind=kind).flatten(1)
        # float32 activations, float64 algebra: equal to float32 rounding
        torch.testing.assert_close(result, exact, rtol=1e-5, atol=1e-6)


def test_ekfac_eigenvalues_are_the_exact_fisher_diagonal_in_the_kronecker_basis():
    torch.manual_seed(1)
    curvature, fisher = _kronecker_case(torch.randn(30, 3), torch.randn(30, 2))  # not Kronecker
    basis = torch.kron(curvature.output_vectors, curvature.input_vectors)
    diagonal = torch.diagonal(basis.T @ fisher @ basis).view(2, 4)
    torch.testing.assert_close(curvature.eigenvalues("ekfac"), diagonal, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(curvature.eigenvalues("kfac"), diagonal, rtol=1e-2)

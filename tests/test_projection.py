"""Random projections: exact where they must be, unbiased where they may only be."""

from __future__ import annotations

import math

import pytest
import torch

from harness.data import encode_completions, encode_documents
from harness.errors import ParameterError
from harness.features import FeatureSpec, Featurizer, TrainFeatures, feature_products
from harness.gradients import GradientEngine, select_linear_modules
from harness.model import GPT, GPTConfig
from harness.projection import DenseProjection, KroneckerProjection, random_matrix
from harness.tokenizer import WordTokenizer

TEXTS = ["ada lives in oslo .", "bob reads in rome and sings .", "the cat sleeps .", "ada sings ."]


def _setup():
    tokenizer = WordTokenizer.fit(TEXTS, min_count=1)
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=len(tokenizer), context=12, depth=1, width=4, heads=1))
    documents = encode_documents(TEXTS, tokenizer, context=12)
    queries = encode_completions(
        ["ada lives in", "bob reads"], ["oslo", "in"], tokenizer, context=12
    )
    return model.eval(), documents, queries


def _orthogonal(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q.float()


def test_an_orthogonal_projection_to_full_dimension_keeps_every_product():
    model, documents, queries = _setup()
    plain = Featurizer(model, FeatureSpec())
    exact = feature_products(
        plain.matrix(queries), TrainFeatures(plain, documents, store=None, key_parts={})
    )
    size = plain.size
    assert 300 < size < 1000  # a few hundred parameters: the matrix is cheap
    projection = DenseProjection.from_matrix(plain.blocks, _orthogonal(size, seed=1))
    projected = Featurizer(
        model, FeatureSpec(projection="gaussian", dim=size), projection=projection
    )
    features = TrainFeatures(projected, documents, store=None, key_parts={})
    torch.testing.assert_close(
        feature_products(projected.matrix(queries), features), exact, rtol=1e-4, atol=1e-5
    )


def test_projected_products_are_unbiased():
    model, documents, queries = _setup()
    engine = GradientEngine(model)
    u, v = engine.matrix(queries)[0], engine.matrix(documents)[0]
    estimates = []
    for seed in range(40):
        projection = DenseProjection(engine.blocks, 64, kind="rademacher", seed=seed)
        pu = projection([b[None] for b in _split(u, engine)])
        pv = projection([b[None] for b in _split(v, engine)])
        estimates.append(float(pu @ pv.T))
    estimates = torch.tensor(estimates, dtype=torch.float64)
    standard_error = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - float(u @ v)) < 4 * standard_error
    # and the spread is the Johnson-Lindenstrauss one: var ≈ (‖u‖²‖v‖² + (u·v)²) / k
    expected_std = math.sqrt((float(u @ u) * float(v @ v) + float(u @ v) ** 2) / 64)
    assert 0.5 * expected_std < float(estimates.std()) < 1.6 * expected_std


def _split(vector, engine):
    return list(torch.split(vector, [block.size for block in engine.blocks]))


def test_projection_matrices_are_seeded_and_the_same_in_pieces():
    model, documents, _ = _setup()
    engine = GradientEngine(model)
    kept = DenseProjection(engine.blocks, 32, kind="gaussian", seed=5)
    regenerated = DenseProjection(
        engine.blocks, 32, kind="gaussian", seed=5, memory_budget_bytes=0
    )
    assert kept.keep and not regenerated.keep
    blocks, _ = engine.gradients(documents)
    torch.testing.assert_close(kept(blocks), regenerated(blocks))
    assert not regenerated._kept  # nothing held beyond the budget
    other = DenseProjection(engine.blocks, 32, kind="gaussian", seed=6)
    assert not torch.allclose(kept.matrix(), other.matrix())


def test_rademacher_entries_are_plus_or_minus_one_over_root_k():
    matrix = random_matrix(50, 16, kind="rademacher", seed=0)
    assert set(torch.unique(matrix * 4).tolist()) == {-1.0, 1.0}
    with pytest.raises(ParameterError, match="'sparse'"):
        random_matrix(3, 3, kind="sparse", seed=0)


def test_kronecker_projection_equals_the_kronecker_product_applied_to_full_gradients():
    model, documents, _ = _setup()
    modules = select_linear_modules(model, "blocks.*")
    projection = KroneckerProjection(modules, 3, kind="gaussian", seed=0)
    featurizer = Featurizer(
        model, FeatureSpec(layers="blocks.*", projection="kronecker", dim=3), projection=projection
    )
    features = torch.cat(featurizer.matrix(documents), dim=1)
    names = [f"{name}.{part}" for name, _ in modules for part in ("weight", "bias")]
    engine = GradientEngine(model, layers=",".join(names))
    gradients = dict(zip(names, _split_columns(engine.matrix(documents), engine), strict=True))
    expected = []
    for name, module in modules:
        weight = gradients[f"{name}.weight"].view(-1, module.out_features, module.in_features)
        bias = gradients[f"{name}.bias"].view(-1, module.out_features, 1)
        full = torch.cat([weight, bias], dim=2)  # (n, out, in + 1): the affine map's gradient
        projector_in, projector_out = projection.factors[name]
        expected.append((projector_out.T @ full @ projector_in).flatten(1))
    torch.testing.assert_close(features, torch.cat(expected, dim=1), rtol=1e-4, atol=1e-6)


def _split_columns(matrix, engine):
    return list(torch.split(matrix, [block.size for block in engine.blocks], dim=1))


def test_equal_configurations_share_one_generated_matrix():
    model, documents, _ = _setup()
    engine = GradientEngine(model)
    first = DenseProjection(engine.blocks, 16, kind="gaussian", seed=7)
    blocks, _ = engine.gradients(documents)
    projected = first(blocks)
    again = DenseProjection(engine.blocks, 16, kind="gaussian", seed=7)
    assert again._kept is first._kept and len(again._kept) == len(again.pieces)
    torch.testing.assert_close(again(blocks), projected)
    other = DenseProjection(engine.blocks, 16, kind="gaussian", seed=8)
    assert other._kept is not first._kept and not other._kept

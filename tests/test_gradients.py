"""Per-example gradients against a plain loop, on both paths; batching and padding don't matter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.data import Sequences, encode_completions, encode_documents
from harness.errors import ParameterError
from harness.features import FeatureSpec, Featurizer, TrainFeatures, feature_products
from harness.gradients import GradientEngine, sample_categorical, select_parameters
from harness.model import GPT, GPTConfig, sequence_losses
from harness.tokenizer import WordTokenizer

TEXTS = [
    "the quick brown fox jumps over the lazy dog .",
    "a hacker writes code .",
    "the dog sleeps while the fox writes quick code over and over again , all night long .",
    "code .",
]


def _setup():
    tokenizer = WordTokenizer.fit(TEXTS, min_count=1)
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=len(tokenizer), context=32, depth=2, width=16, heads=2))
    return tokenizer, model.eval()


def _loop_gradient(model: nn.Module, parameters, inputs, targets, mask) -> torch.Tensor:
    """The reference: one autograd call on one unpadded sequence."""
    loss = sequence_losses(model(inputs[None]), targets[None], mask[None]).sum()
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)])


def _loop_matrix(model, parameters, sequences: Sequences) -> torch.Tensor:
    rows = []
    for i in range(len(sequences)):
        n = int(sequences.loss_mask[i].nonzero().max()) + 1  # unpadded length
        rows.append(
            _loop_gradient(
                model,
                parameters,
                sequences.inputs[i, :n],
                sequences.targets[i, :n],
                sequences.loss_mask[i, :n],
            )
        )
    return torch.stack(rows)


@pytest.mark.parametrize("layers", ["*", "blocks.*", "head.*", "blocks.1.mlp.*,norm_final.*"])
@pytest.mark.parametrize("fast", [True, False])
def test_per_example_gradients_equal_a_plain_loop(layers, fast):
    tokenizer, model = _setup()
    sequences = encode_documents(TEXTS, tokenizer, context=32)
    engine = GradientEngine(model, layers=layers, chunk_size=3)
    engine._fast = fast  # the torch.func path is the fallback; both must be exact
    expected = _loop_matrix(model, [p for _, p in engine.parameters], sequences)
    torch.testing.assert_close(engine.matrix(sequences), expected, rtol=1e-4, atol=1e-6)
    assert engine._fast == fast


def test_the_tied_head_gets_both_contributions():
    tokenizer, model = _setup()
    assert model.head.weight is model.token_embedding.weight
    engine = GradientEngine(model, layers="head.*")
    assert [name for name, _ in engine.parameters] == ["token_embedding.weight"]
    sequences = encode_documents(TEXTS[:2], tokenizer, context=32)
    expected = _loop_matrix(model, [model.token_embedding.weight], sequences)
    torch.testing.assert_close(engine.matrix(sequences), expected, rtol=1e-4, atol=1e-6)


def test_query_gradients_cover_only_the_target():
    tokenizer, model = _setup()
    queries = encode_completions(
        ["the quick", "a hacker"], ["fox", "writes"], tokenizer, context=32
    )
    engine = GradientEngine(model)
    expected = _loop_matrix(model, [p for _, p in engine.parameters], queries)
    torch.testing.assert_close(engine.matrix(queries), expected, rtol=1e-4, atol=1e-6)


class _RawParameterModel(nn.Module):
    """A parameter used outside any module the fast path knows: the fallback must take over."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.head = nn.Linear(8, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.embedding(ids) * self.scale))


class _SneakyTiedModel(nn.Module):
    """The head's weight also used by a raw matmul: only the self-check can notice."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 8)
        self.mix = nn.Linear(8, 8)

    def forward(self, ids):
        return self.mix(self.embedding(ids)) @ self.embedding.weight.T


@pytest.mark.parametrize("model_class", [_RawParameterModel, _SneakyTiedModel])
def test_other_models_fall_back_to_the_exact_reference_path(model_class, caplog):
    tokenizer, _ = _setup()
    torch.manual_seed(0)
    model = model_class(len(tokenizer))
    sequences = encode_documents(TEXTS, tokenizer, context=32)
    engine = GradientEngine(model, chunk_size=2)
    gradients = engine.matrix(sequences)
    assert not engine._fast
    expected = _loop_matrix(model, [p for _, p in engine.parameters], sequences)
    torch.testing.assert_close(gradients, expected, rtol=1e-4, atol=1e-6)


def test_document_gradient_does_not_depend_on_batching_or_padding():
    tokenizer, model = _setup()
    sequences = encode_documents(TEXTS, tokenizer, context=32)
    alone = GradientEngine(model, chunk_size=1).matrix(sequences[1:2])[0]  # no padding at all
    beside_long = GradientEngine(model, chunk_size=2).matrix(sequences[1:3])[0]
    everything = GradientEngine(model, chunk_size=4).matrix(sequences)[1]
    torch.testing.assert_close(beside_long, alone, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(everything, alone, rtol=1e-4, atol=1e-6)


def test_padding_never_enters_a_loss():
    tokenizer, model = _setup()
    sequences = encode_documents(TEXTS, tokenizer, context=32)
    assert sequences.loss_mask[1, int(sequences.loss_mask[1].sum()) :].sum() == 0
    # changing what sits in the padded positions changes nothing
    clean = sequences[0:4]
    corrupted = Sequences(clean.inputs.clone(), clean.targets.clone(), clean.loss_mask.clone())
    padding = corrupted.loss_mask == 0
    corrupted.inputs[padding], corrupted.targets[padding] = 5, 7
    assert not torch.equal(corrupted.inputs, sequences.inputs[0:4, : clean.inputs.shape[1]])
    engine = GradientEngine(model)
    torch.testing.assert_close(
        engine.matrix(corrupted), engine.matrix(sequences[0:4]), rtol=1e-4, atol=1e-6
    )


def test_products_and_cosines_match_explicit_matrices():
    tokenizer, model = _setup()
    documents = encode_documents(TEXTS, tokenizer, context=32)
    queries = encode_completions(
        ["the quick", "a hacker"], ["fox", "writes"], tokenizer, context=32
    )
    engine = GradientEngine(model)
    q, d = engine.matrix(queries), engine.matrix(documents)
    featurizer = Featurizer(model, FeatureSpec(), chunk_size=3)
    features = TrainFeatures(featurizer, documents, store=None, key_parts={})
    query_blocks = featurizer.matrix(queries)
    torch.testing.assert_close(
        feature_products(query_blocks, features).float(), q @ d.T, rtol=1e-4, atol=1e-5
    )
    cosines = torch.nn.functional.cosine_similarity(q[:, None, :], d[None, :, :], dim=-1)
    torch.testing.assert_close(
        feature_products(query_blocks, features, normalize=True).float(),
        cosines,
        rtol=1e-4,
        atol=1e-6,
    )


def test_a_zero_gradient_has_cosine_zero_not_nan():
    tokenizer, model = _setup()
    documents = encode_documents(TEXTS[:2], tokenizer, context=32)
    featurizer = Featurizer(model, FeatureSpec(), chunk_size=3)
    features = TrainFeatures(featurizer, documents, store=None, key_parts={})
    zero = [torch.zeros(1, block.size) for block in featurizer.blocks]
    cosines = feature_products(zero, features, normalize=True)
    assert torch.equal(cosines.float(), torch.zeros(1, 2))


def test_chunks_cover_every_sequence_in_order():
    tokenizer, model = _setup()
    sequences = encode_documents(TEXTS, tokenizer, context=32)
    sizes = [
        blocks[0].shape[0] for blocks, _ in GradientEngine(model, chunk_size=3).chunks(sequences)
    ]
    assert sizes == [3, 1]


def test_layer_patterns_that_match_nothing_are_refused_with_the_module_names():
    _, model = _setup()
    with pytest.raises(ParameterError, match=r"'nothing\.\*'.*blocks\.0\.mlp\.0"):
        select_parameters(model, "nothing.*")


def test_sampled_labels_follow_the_model_distribution_and_never_draw_an_impossible_one():
    probabilities = torch.tensor([[0.5, 0.0, 0.2, 0.3], [0.0, 0.0, 0.0, 1.0]]).repeat(100_000, 1)
    drawn = sample_categorical(probabilities, torch.Generator().manual_seed(0))
    first, second = drawn[0::2], drawn[1::2]
    frequencies = torch.bincount(first, minlength=4) / len(first)
    # 100,000 draws: a standard error of at most 0.0016 per category
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.0, 0.2, 0.3]), atol=0.008, rtol=0)
    assert (second == 3).all()
    again = sample_categorical(probabilities, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)

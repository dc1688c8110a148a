"""Per-example gradients against a plain loop, and their independence from batching."""

from __future__ import annotations

import torch

from harness.data import Sequences, encode_completions, encode_documents
from harness.gradients import gradient_matrix, gradient_products, per_example_gradients
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


def _loop_gradient(model: GPT, inputs, targets, mask) -> torch.Tensor:
    """The reference: one autograd call on one unpadded sequence."""
    model.zero_grad()
    loss = sequence_losses(model(inputs[None]), targets[None], mask[None]).sum()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_vectorised_gradients_equal_a_plain_loop():
    tokenizer, model = _setup()
    sequences = encode_documents(TEXTS, tokenizer, context=32)
    vectorised = gradient_matrix(model, sequences, chunk_size=3)
    for i in range(len(TEXTS)):
        n = int(sequences.loss_mask[i].sum())  # unpadded length
        expected = _loop_gradient(
            model, sequences.inputs[i, :n], sequences.targets[i, :n], sequences.loss_mask[i, :n]
        )
        torch.testing.assert_close(vectorised[i], expected, rtol=1e-4, atol=1e-6)


def test_document_gradient_does_not_depend_on_batching_or_padding():
    tokenizer, model = _setup()
    sequences = encode_documents(TEXTS, tokenizer, context=32)
    alone = gradient_matrix(model, sequences[1:2], chunk_size=1)[0]  # no padding at all
    beside_long = gradient_matrix(model, sequences[1:3], chunk_size=2)[0]  # padded to the long one
    everything = gradient_matrix(model, sequences, chunk_size=4)[1]
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
    torch.testing.assert_close(
        gradient_matrix(model, corrupted),
        gradient_matrix(model, sequences[0:4]),
        rtol=1e-4,
        atol=1e-6,
    )


def test_completion_loss_covers_only_the_target():
    tokenizer, _ = _setup()
    sequences = encode_completions(["the quick brown fox"], ["jumps"], tokenizer, context=32)
    assert sequences.loss_mask.tolist() == [[0, 0, 0, 0, 1]]
    assert tokenizer.decode([int(sequences.targets[0, 4])]) == "jumps"


def test_products_and_cosines_match_explicit_matrices():
    tokenizer, model = _setup()
    documents = encode_documents(TEXTS, tokenizer, context=32)
    queries = encode_completions(
        ["the quick", "a hacker"], ["fox", "writes"], tokenizer, context=32
    )
    q, d = gradient_matrix(model, queries), gradient_matrix(model, documents)
    torch.testing.assert_close(
        gradient_products(model, queries, documents, chunk_size=3), q @ d.T, rtol=1e-4, atol=1e-6
    )
    cosines = torch.nn.functional.cosine_similarity(q[:, None, :], d[None, :, :], dim=-1)
    torch.testing.assert_close(
        gradient_products(model, queries, documents, normalize=True, chunk_size=2),
        cosines,
        rtol=1e-4,
        atol=1e-6,
    )


def test_chunks_cover_every_sequence_in_order():
    tokenizer, model = _setup()
    sequences = encode_documents(TEXTS, tokenizer, context=32)
    sizes = [chunk.shape[0] for chunk in per_example_gradients(model, sequences, chunk_size=3)]
    assert sizes == [3, 1]

"""Mixture log-probabilities and responsibilities against plain-loop references."""

from __future__ import annotations

import math

import pytest
import torch

from harness.data import Sequences
from harness.mixture import mixture_logprobs, responsibilities, token_logprobs, valid_positions
from harness.model import GPT, GPTConfig, sequence_losses


def _completions(n: int, prompt: int, target: int, pad: int, vocab: int) -> Sequences:
    """Rows of ``prompt`` unscored then ``target`` scored tokens, right-padded by ``pad``."""
    generator = torch.Generator().manual_seed(1)
    length = prompt + target + pad
    inputs = torch.randint(1, vocab, (n, length), generator=generator)
    targets = torch.randint(1, vocab, (n, length), generator=generator)
    inputs[:, prompt + target :] = 0
    targets[:, prompt + target :] = 0
    mask = torch.zeros(n, length)
    mask[:, prompt : prompt + target] = 1.0
    return Sequences(inputs, targets, mask)


def _random_token_logprobs(k: int, sequences: Sequences) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    values = -torch.rand(k, *sequences.inputs.shape, generator=generator, dtype=torch.float64) * 4
    return values * valid_positions(sequences)


def test_valid_positions_cover_prompt_and_target_but_not_padding():
    sequences = _completions(3, prompt=4, target=2, pad=3, vocab=20)
    valid = valid_positions(sequences)
    assert valid[:, :6].eq(1).all() and valid[:, 6:].eq(0).all()


def test_a_one_expert_mixture_equals_the_plain_model():
    model = GPT(GPTConfig(vocab_size=20, context=16, depth=1, width=16, heads=2)).eval()
    sequences = _completions(5, prompt=3, target=3, pad=2, vocab=20)
    plain = -sequence_losses(model(sequences.inputs), sequences.targets, sequences.loss_mask)
    logprobs = token_logprobs(model, sequences).unsqueeze(0)
    for weighting in ("uniform", "prompt"):
        mixed = mixture_logprobs(logprobs, sequences.loss_mask.double(), weighting=weighting)
        torch.testing.assert_close(mixed, plain.double(), rtol=1e-5, atol=1e-5)


def test_uniform_mixing_averages_each_tokens_distribution():
    sequences = _completions(4, prompt=2, target=3, pad=1, vocab=10)
    logprobs = _random_token_logprobs(3, sequences)
    mixed = mixture_logprobs(logprobs, sequences.loss_mask.double(), weighting="uniform")
    for row in range(4):
        expected = sum(
            math.log(sum(math.exp(logprobs[k, row, t]) for k in range(3)) / 3) for t in range(2, 5)
        )
        assert mixed[row].item() == pytest.approx(expected, rel=1e-9)


def test_prompt_weighting_is_bayesian_model_averaging():
    # p(target | prompt) = Σ_k p_k(prompt, target) / Σ_k p_k(prompt)
    sequences = _completions(4, prompt=3, target=2, pad=2, vocab=10)
    logprobs = _random_token_logprobs(4, sequences)
    mixed = mixture_logprobs(logprobs, sequences.loss_mask.double(), weighting="prompt")
    for row in range(4):
        joint = sum(math.exp(logprobs[k, row, :5].sum()) for k in range(4))
        prompt = sum(math.exp(logprobs[k, row, :3].sum()) for k in range(4))
        assert mixed[row].item() == pytest.approx(math.log(joint / prompt), rel=1e-9)


@pytest.mark.parametrize("weighting", ["uniform", "prompt"])
def test_responsibilities_sum_to_one_and_dropped_experts_get_none(weighting):
    sequences = _completions(6, prompt=3, target=2, pad=1, vocab=10)
    logprobs = _random_token_logprobs(5, sequences)
    scored = sequences.loss_mask.double()
    shares = responsibilities(logprobs, scored, weighting=weighting)
    assert shares.shape == (6, 5)
    torch.testing.assert_close(shares.sum(dim=1), torch.ones(6, dtype=torch.float64))
    without = responsibilities(logprobs, scored, weighting=weighting, dropped=(1, 3))
    assert without[:, [1, 3]].eq(0).all()
    torch.testing.assert_close(without.sum(dim=1), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("weighting", ["uniform", "prompt"])
def test_dropping_an_expert_removes_exactly_its_weighted_share(weighting):
    # one-token targets: p_mix = (1 - w_j) p_without_j + w_j p_j, with w_j the expert's weight
    # for this prompt, so dropping an expert that gives the target no probability scales it by
    # 1 / (1 - w_j) and nothing else
    sequences = _completions(5, prompt=3, target=1, pad=2, vocab=10)
    logprobs = _random_token_logprobs(4, sequences)
    scored = sequences.loss_mask.double()
    full = mixture_logprobs(logprobs, scored, weighting=weighting).exp()
    prompt_only = (logprobs * (1 - scored)).sum(dim=-1)  # (K, n)
    if weighting == "uniform":
        weights = torch.full((5, 4), 0.25, dtype=torch.float64)
    else:
        weights = torch.softmax(prompt_only, dim=0).T
    own = (logprobs * scored).sum(dim=-1).exp().T  # (n, K): p_k(target | prompt)
    for j in range(4):
        without = mixture_logprobs(logprobs, scored, weighting=weighting, dropped=(j,)).exp()
        w = weights[:, j]
        torch.testing.assert_close(full, (1 - w) * without + w * own[:, j])


def test_bad_weighting_or_drop_is_refused():
    sequences = _completions(2, prompt=2, target=1, pad=0, vocab=10)
    logprobs = _random_token_logprobs(2, sequences)
    scored = sequences.loss_mask.double()
    with pytest.raises(ValueError, match="weighting must be one of"):
        mixture_logprobs(logprobs, scored, weighting="softmax")
    with pytest.raises(ValueError, match="cannot drop experts \\[2\\]"):
        mixture_logprobs(logprobs, scored, weighting="uniform", dropped=(2,))
    with pytest.raises(ValueError, match="leaves no expert"):
        responsibilities(logprobs, scored, weighting="uniform", dropped=(0, 1))

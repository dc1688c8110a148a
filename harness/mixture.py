"""Mixtures of expert language models: log-probabilities, responsibilities, exact removal.

Every quantity here comes from one tensor, each expert's log-probability of each
next token, ``token_logprobs`` of shape (K, n, T): one forward pass per expert.
Two ways of mixing the experts' next-token distributions:

- ``uniform``: every token is predicted by the average of the members'
  distributions, ``p(x_t | x_<t) = mean_k p_k(x_t | x_<t)``.
- ``prompt``: weights inferred from the text so far, the Bayesian posterior over
  members under a uniform prior, ``w_k(t) ∝ p_k(x_<t)``. For a prompt and
  target this is Bayesian model averaging: ``p(target | prompt) =
  Σ_k p_k(prompt, target) / Σ_k p_k(prompt)``.

Dropping an expert is exact: the mixture of the remaining members is the model
that never had that expert's data, so leave-one-shard-out effects cost no
retraining.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

from harness.data import Sequences

WEIGHTINGS = ("uniform", "prompt")


@torch.no_grad()
def token_logprobs(
    model: torch.nn.Module, sequences: Sequences, *, batch_size: int = 128
) -> torch.Tensor:
    """log p(target token | inputs so far) at every position, (n, T); 0 where padding."""
    rows = []
    for start in range(0, len(sequences), batch_size):
        inputs = sequences.inputs[start : start + batch_size]
        targets = sequences.targets[start : start + batch_size]
        logprobs = torch.log_softmax(model(inputs).double(), dim=-1)
        rows.append(logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    return torch.cat(rows) * valid_positions(sequences)


def valid_positions(sequences: Sequences) -> torch.Tensor:
    """1 at every real token (prompt or target), 0 at padding; (n, T) float64.

    Both encoders end each row with scored tokens (a target, or a whole
    document), so a row's real tokens run up to its last scored one.
    """
    scored = sequences.loss_mask.double()
    return scored.flip(1).cummax(dim=1).values.flip(1)


def _members(k: int, dropped: Collection[int]) -> torch.Tensor:
    unknown = set(dropped) - set(range(k))
    if unknown:
        raise ValueError(f"cannot drop experts {sorted(unknown)}: there are {k} (0 to {k - 1})")
    members = torch.ones(k, dtype=torch.bool)
    members[list(dropped)] = False
    if not members.any():
        raise ValueError(f"dropping {sorted(dropped)} leaves no expert in the mixture")
    return members


def mixture_logprobs(
    token_logprobs: torch.Tensor,
    scored: torch.Tensor,
    *,
    weighting: str,
    dropped: Collection[int] = (),
) -> torch.Tensor:
    """log p(scored tokens | the rest) under the mixture of the experts not ``dropped``; (n,).

    token_logprobs (K, n, T) from :func:`token_logprobs` (zero at padding);
    scored (n, T), 1 at the tokens whose probability is wanted (a target, or
    every token of a document).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, but got {weighting!r}")
    members = _members(token_logprobs.shape[0], dropped)
    logprobs = token_logprobs[members]
    if weighting == "uniform":
        per_token = torch.logsumexp(logprobs, dim=0) - math.log(int(members.sum()))
    else:
        # each member's log-likelihood of everything before position t
        before = torch.cumsum(logprobs, dim=-1) - logprobs
        per_token = torch.logsumexp(before + logprobs, dim=0) - torch.logsumexp(before, dim=0)
    return (per_token * scored).sum(dim=-1)


def responsibilities(
    token_logprobs: torch.Tensor,
    scored: torch.Tensor,
    *,
    weighting: str,
    dropped: Collection[int] = (),
) -> torch.Tensor:
    """Posterior share of each expert in producing the scored tokens, (n, K); rows sum to 1.

    ``r_k = w_k p_k(scored | rest) / Σ_j w_j p_j(scored | rest)`` with the
    mixture's weights for the text before: uniform, or the posterior given the
    prompt. Dropped experts get 0.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, but got {weighting!r}")
    members = _members(token_logprobs.shape[0], dropped)
    log_weight = (token_logprobs * scored).sum(dim=-1)  # log p_k(scored | rest)
    if weighting == "prompt":
        # the unscored real tokens are the prompt: the prior becomes its posterior
        log_weight = token_logprobs.sum(dim=-1)
    log_weight = log_weight.masked_fill(~members.unsqueeze(1), -math.inf)
    return torch.softmax(log_weight, dim=0).T

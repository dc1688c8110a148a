"""Fidelity metrics against planted ground truth, with bootstrap confidence intervals.

Every metric is computed per query, then averaged; the 95% interval is a
percentile bootstrap over queries. Ties in a score row are broken at random
(seeded), so a method that gives many documents the same score gets the
expected, not the luckiest, rank for its relevant documents.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

RECALL_KS = (1, 10, 50)
CONFIDENCE = 0.95


def ranking(scores: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """Document indices from highest to lowest score, ties in random order."""
    tie_breaker = rng.random(scores.shape[0])
    return np.lexsort((tie_breaker, -scores))


def query_metrics(
    scores: np.ndarray,
    relevant: Sequence[Sequence[int]],
    *,
    ks: Sequence[int] = RECALL_KS,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per-query reciprocal rank, recall@k and average precision (AUPRC).

    scores (n_queries, n_documents); relevant[q] lists the indices of query q's
    responsible documents (at least one).
    """
    if scores.ndim != 2 or scores.shape[0] != len(relevant):
        raise ValueError(
            f"scores must be (n_queries={len(relevant)}, n_documents), "
            f"but got shape {scores.shape}"
        )
    rng = np.random.default_rng(seed)
    rows: dict[str, list[float]] = {
        "reciprocal_rank": [],
        "average_precision": [],
        "first_relevant_rank": [],
    }
    rows.update({f"recall_at_{k}": [] for k in ks})
    for row, relevant_docs in zip(scores, relevant, strict=True):
        if len(relevant_docs) == 0:
            raise ValueError("every scored query needs at least one relevant document")
        is_relevant = np.zeros(scores.shape[1], dtype=bool)
        is_relevant[list(relevant_docs)] = True
        hits = is_relevant[ranking(row, rng=rng)]  # relevance in rank order
        ranks = np.flatnonzero(hits) + 1  # 1-based ranks of the relevant documents
        rows["first_relevant_rank"].append(ranks[0])
        rows["reciprocal_rank"].append(1.0 / ranks[0])
        rows["average_precision"].append(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))
        for k in ks:
            rows[f"recall_at_{k}"].append(float(hits[:k].sum() / len(ranks)))
    return {name: np.asarray(values, dtype=float) for name, values in rows.items()}


def mean_with_ci(
    values: np.ndarray, *, seed: int = 0, resamples: int = 2000
) -> tuple[float, float, float]:
    """Mean and its percentile-bootstrap 95% interval over the given per-query values."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2 or np.all(values == values[0]):
        return mean, mean, mean
    result = stats.bootstrap(
        (values,),
        np.mean,
        confidence_level=CONFIDENCE,
        n_resamples=resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)


# names of the logged metrics, from the per-query columns they average
SUMMARY_NAMES = {
    "reciprocal_rank": "mrr",
    "average_precision": "auprc",
    **{f"recall_at_{k}": f"recall_at_{k}" for k in RECALL_KS},
}


def summarize(per_query: dict[str, np.ndarray], *, seed: int = 0) -> dict[str, float]:
    """``mrr``, ``recall_at_k`` and ``auprc`` with ``_ci_low`` and ``_ci_high``."""
    summary = {}
    for column, name in SUMMARY_NAMES.items():
        mean, low, high = mean_with_ci(per_query[column], seed=seed)
        summary.update({name: mean, f"{name}_ci_low": low, f"{name}_ci_high": high})
    return summary


# --- counterfactual and reliability metrics ----------------------------------------


def rank_correlations(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``first`` with the same row of ``second``.

    A row that is constant in either array ranks nothing; its correlation is 0,
    the value of a predictor that carries no information, not NaN.
    """
    first, second = np.atleast_2d(first), np.atleast_2d(second)
    if first.shape != second.shape:
        raise ValueError(f"shapes differ: {first.shape} and {second.shape}")
    a = stats.rankdata(first, axis=1)
    b = stats.rankdata(second, axis=1)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    numerator = (a * b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        correlations = np.where(denominator > 0, numerator / denominator, 0.0)
    return np.clip(correlations, -1.0, 1.0)


def lds_per_query(scores: np.ndarray, masks: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The linear datamodeling score of each query (Park et al., 2023).

    scores (n_queries, n_documents); masks (n_models, n_documents), True where a
    retrained model kept the document; targets (n_models, n_queries), each
    model's target log-probability. Per query: the Spearman correlation, over
    models, between the sum of the query's scores over the model's documents and
    the model's target log-probability.
    """
    if masks.shape[1] != scores.shape[1] or targets.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(
            f"LDS needs scores (Q, n), masks (M, n) and targets (M, Q), but got "
            f"{scores.shape}, {masks.shape} and {targets.shape}"
        )
    predicted = masks.astype(np.float64) @ scores.T  # (M, Q)
    return rank_correlations(predicted.T, targets.T)

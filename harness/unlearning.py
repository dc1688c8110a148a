"""The unlearning check for models built from removable shards (partitioned experts).

For each scored query whose target the full model prefers among its candidates:
drop the shards that hold any of the query's relevant documents and see whether
the fact is gone (the target is no longer the likeliest candidate); drop one
other shard, chosen at random, and see whether it stays. Log-probabilities of
the target under each are compared with the level of a model that never saw the
fact where there is one: the leave-one-owner-out retrain of the query's owner
on tasks with owners, else the LDS pool's models that kept none of the
query's relevant documents.

Metrics: ``unlearn_queries`` (queries checked), ``unlearn_forgotten`` and
``unlearn_kept_other`` (shares of them), ``unlearn_logprob_full``,
``unlearn_logprob_without_responsible``, ``unlearn_logprob_without_other`` and,
with a reference, ``unlearn_logprob_never_seen`` (means over the checked
queries), and ``unlearn_not_removable`` (queries with a relevant document in a
public portion that no shard holds, which dropping experts cannot forget).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from harness.bundle import Bundle
from harness.data import Query
from harness.retrain import SubsetPool


@runtime_checkable
class RemovableShards(Protocol):
    """A fitted model made of shards that can be dropped exactly."""

    # (n_documents,) the shard holding each document; -1 for a public portion no shard holds
    shard_of: np.ndarray

    def counterfactual_logprobs(
        self,
        bundle: Bundle,
        prompts: Sequence[str],
        targets: Sequence[str],
        dropped: Sequence[Collection[int]],
    ) -> np.ndarray:
        """Row i: log p(targets[i] | prompts[i]) with the shards ``dropped[i]`` removed."""


def unlearning_metrics(
    model: RemovableShards,
    bundle: Bundle,
    queries: list[Query],
    *,
    never_seen: Mapping[str, float] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    index = {doc_id: i for i, doc_id in enumerate(bundle.data.document_ids)}
    shards = sorted(set(model.shard_of.tolist()) - {-1})
    checked, not_removable = [], 0
    for query in queries:
        holding = {int(model.shard_of[index[d]]) for d in query.relevant}
        if -1 in holding:
            not_removable += 1
            continue
        others = [s for s in shards if s not in holding]
        other = int(rng.choice(others)) if others else None
        checked.append((query, sorted(holding), other))

    prompts, targets, dropped = [], [], []
    for query, holding, other in checked:
        candidates = list(query.candidates) or [query.target]
        for removal in ((), holding, () if other is None else (other,)):
            prompts += [query.prompt] * len(candidates)
            targets += candidates
            dropped += [removal] * len(candidates)
    logprobs = model.counterfactual_logprobs(bundle, prompts, targets, dropped) if prompts else []

    results = []  # per query: (learned, forgotten, kept by other, three target log-probs)
    start = 0
    for query, _, other in checked:
        candidates = list(query.candidates) or [query.target]
        position = candidates.index(query.target)
        blocks = []
        for _ in range(3):
            blocks.append(np.asarray(logprobs[start : start + len(candidates)]))
            start += len(candidates)
        full, without_holding, without_other = blocks
        results.append(
            {
                "query": query.id,
                "learned": int(np.argmax(full)) == position,
                "forgotten": int(np.argmax(without_holding)) != position,
                "kept_other": None if other is None else int(np.argmax(without_other)) == position,
                "full": full[position],
                "without_responsible": without_holding[position],
                "without_other": None if other is None else without_other[position],
            }
        )

    learned = [r for r in results if r["learned"]]
    metrics: dict[str, float] = {
        "unlearn_queries": len(learned),
        "unlearn_not_removable": not_removable,
    }
    if not learned:
        return metrics
    with_other = [r for r in learned if r["kept_other"] is not None]
    metrics |= {
        "unlearn_forgotten": float(np.mean([r["forgotten"] for r in learned])),
        "unlearn_logprob_full": float(np.mean([r["full"] for r in learned])),
        "unlearn_logprob_without_responsible": float(
            np.mean([r["without_responsible"] for r in learned])
        ),
    }
    if with_other:
        metrics |= {
            "unlearn_kept_other": float(np.mean([r["kept_other"] for r in with_other])),
            "unlearn_logprob_without_other": float(
                np.mean([r["without_other"] for r in with_other])
            ),
        }
    if never_seen:
        levels = [never_seen.get(r["query"], np.nan) for r in learned]
        if not np.isnan(levels).all():
            metrics["unlearn_logprob_never_seen"] = float(np.nanmean(levels))
    return metrics


def never_seen_in_pool(pool: SubsetPool, bundle: Bundle, queries: list[Query]) -> dict[str, float]:
    """Per query, the mean target log-probability of the pool's models that kept none of its
    relevant documents: models that never saw the fact. Queries without such a model are
    left out."""
    index = {doc_id: i for i, doc_id in enumerate(bundle.data.document_ids)}
    targets = pool.targets([q.id for q in queries])
    levels = {}
    for column, query in enumerate(queries):
        unseen = ~pool.masks[:, [index[d] for d in query.relevant]].any(axis=1)
        if unseen.any():
            levels[query.id] = float(targets[unseen, column].mean())
    return levels

"""The unlearning check for models built from removable shards (partitioned experts).

For each scored query whose target the full model prefers among its candidates:
drop the shards that hold any of the query's relevant documents and see whether
the fact is gone (the target is no longer the likeliest candidate); drop one
other shard and see whether it stays. The other shard is the strongest control
there is: of the shards holding none of the fact's documents, the one whose
removal lowers the target's log-probability most.

A query is *not removable* when no drop can take its fact away: a relevant
document sits in a public portion that no shard holds, or the fact's documents
are spread over every shard, so that dropping them all would leave no model.

Metrics: ``unlearn_queries`` (queries checked), ``unlearn_not_removable``,
``unlearn_forgotten`` and ``unlearn_kept_other`` (shares of the checked
queries), and the mean target log-probabilities ``unlearn_logprob_full``,
``unlearn_logprob_without_responsible`` and ``unlearn_logprob_without_other``.
Where there is a model that never saw the fact (on tasks with owners the
leave-one-owner-out retrain of the query's owner, else the LDS pool's models
that kept none of the query's relevant documents), ``unlearn_never_seen_queries``
counts the checked queries that have one, and ``unlearn_logprob_never_seen`` and
``unlearn_gap_never_seen`` (without-responsible minus never-seen: near 0 or
below when the fact is gone) average over exactly those queries.
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
) -> dict[str, float]:
    index = {doc_id: i for i, doc_id in enumerate(bundle.data.document_ids)}
    shards = sorted(set(model.shard_of.tolist()) - {-1})
    removable, not_removable = [], 0
    for query in queries:
        holding = sorted({int(model.shard_of[index[d]]) for d in query.relevant})
        if -1 in holding or len(holding) == len(shards):
            not_removable += 1
        else:
            removable.append((query, holding))
    metrics: dict[str, float] = {"unlearn_queries": 0, "unlearn_not_removable": not_removable}
    if not removable:
        return metrics

    # the control: the non-holding shard whose removal costs the target most
    prompts, targets, dropped = [], [], []
    for query, holding in removable:
        for shard in shards:
            if shard not in holding:
                prompts.append(query.prompt)
                targets.append(query.target)
                dropped.append((shard,))
    costs = iter(model.counterfactual_logprobs(bundle, prompts, targets, dropped))
    checks = []
    for query, holding in removable:
        others = [s for s in shards if s not in holding]
        without = [next(costs) for _ in others]
        checks.append((query, holding, others[int(np.argmin(without))]))

    prompts, targets, dropped = [], [], []
    for query, holding, other in checks:
        candidates = list(query.candidates) or [query.target]
        for removal in ((), tuple(holding), (other,)):
            prompts += [query.prompt] * len(candidates)
            targets += candidates
            dropped += [removal] * len(candidates)
    logprobs = model.counterfactual_logprobs(bundle, prompts, targets, dropped)

    rows, start = [], 0
    for query, _, _ in checks:
        candidates = list(query.candidates) or [query.target]
        target = candidates.index(query.target)
        full, without_holding, without_other = (
            logprobs[start + i * len(candidates) : start + (i + 1) * len(candidates)]
            for i in range(3)
        )
        start += 3 * len(candidates)
        if int(np.argmax(full)) != target:
            continue  # the mixture never learned it: there is nothing to forget
        rows.append(
            {
                "query": query.id,
                "forgotten": int(np.argmax(without_holding)) != target,
                "kept_other": int(np.argmax(without_other)) == target,
                "full": full[target],
                "without_responsible": without_holding[target],
                "without_other": without_other[target],
            }
        )
    metrics["unlearn_queries"] = len(rows)
    if not rows:
        return metrics
    for name in ("forgotten", "kept_other"):
        metrics[f"unlearn_{name}"] = float(np.mean([r[name] for r in rows]))
    for name in ("full", "without_responsible", "without_other"):
        metrics[f"unlearn_logprob_{name}"] = float(np.mean([r[name] for r in rows]))
    paired = [r for r in rows if never_seen and np.isfinite(never_seen.get(r["query"], np.nan))]
    metrics["unlearn_never_seen_queries"] = len(paired)
    if paired:
        levels = np.array([never_seen[r["query"]] for r in paired])
        without = np.array([r["without_responsible"] for r in paired])
        metrics["unlearn_logprob_never_seen"] = float(levels.mean())
        metrics["unlearn_gap_never_seen"] = float((without - levels).mean())
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

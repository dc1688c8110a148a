"""Owner-level ground truth and metrics, for tasks whose documents belong to data owners.

Ground truth: for each owner, a model retrained without that owner's documents
(the task's recipe and epochs, the reference model's seed), and every query's
target log-probability under it. An owner's *drop* for a query is the reference
model's log-probability minus that retrain's. The K retrains are cached one
file per owner, written atomically, so an interrupted build resumes.

Metrics, for any method: document scores summed per owner, then

- ``owner_top1``: the share of queries whose highest-scored owner is the owner
  whose fact is queried (a tie at the top counts as a fair draw among the tied);
- ``owner_spearman``: Spearman correlation, across owners, between the owner
  scores and the leave-one-owner-out drops, averaged over queries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import harness
from harness.bundle import Bundle
from harness.cache import code_fingerprint, content_key
from harness.data import Query
from harness.executor import default_executor
from harness.metrics import mean_with_ci, rank_correlations
from harness.retrain import retrain_job, run_retrain, target_logprobs, write_atomically

_logger = logging.getLogger(__name__)

_CODE = [Path(harness.__file__).with_name(f) for f in ("retrain.py", "training.py", "model.py")]


@dataclasses.dataclass(frozen=True)
class OwnerEffects:
    """Each owner's leave-one-owner-out retrain: target log-probabilities of every query."""

    owners: tuple[str, ...]
    query_ids: tuple[str, ...]
    reference: np.ndarray  # (n_queries,) the reference model's
    without: np.ndarray  # (n_owners, n_queries) the model retrained without owner k
    heldout_losses: np.ndarray  # (n_owners,)

    def drops(self, query_ids: Sequence[str]) -> np.ndarray:
        """Reference minus retrained log-probability, (len(query_ids), n_owners)."""
        columns = self._columns(query_ids)
        return (self.reference[columns] - self.without[:, columns]).T

    def without_owner(self, query_ids: Sequence[str], owners: Sequence[str]) -> np.ndarray:
        """Each query's log-probability under the model that never saw the given owner."""
        rows = [self.owners.index(owner) for owner in owners]
        return self.without[rows, self._columns(query_ids)]

    def _columns(self, query_ids: Sequence[str]) -> list[int]:
        column = {query_id: i for i, query_id in enumerate(self.query_ids)}
        return [column[q] for q in query_ids]


def leave_one_owner_out(bundle: Bundle) -> OwnerEffects:
    """Load the K retrains, training those not yet stored."""
    owners = bundle.data.owners
    if not owners:
        raise ValueError(f"task {bundle.task!r} has no data owners")
    if bundle.cache is None:
        raise ValueError("this bundle has no cache to keep owner retrains in")
    key = content_key(
        {"setup": bundle.setup_key, "seed": bundle.seed, "code": code_fingerprint(_CODE)}
    )
    folder = bundle.cache.path("owners", key)
    folder.mkdir(parents=True, exist_ok=True)
    query_ids = [q.id for q in bundle.data.queries]
    owner_of = np.array([d.owner for d in bundle.data.documents])
    paths = [folder / f"without-{k:03d}.json" for k in range(len(owners))]
    missing = [k for k, path in enumerate(paths) if not path.is_file()]
    if missing:
        _logger.info(
            "owner ground truth: %d of %d leave-one-owner-out retrains to train",
            len(missing), len(owners),
        )  # fmt: skip
        jobs = [
            retrain_job(bundle, k, bundle.seed, np.flatnonzero(owner_of != owners[k]))
            for k in missing
        ]
        progress = tqdm(total=len(jobs), desc="owner retrains", unit="model", disable=None)
        with progress, _report_interruption(paths):
            for job, result in default_executor().run(run_retrain, jobs):
                record = {
                    "owner": owners[job.index],
                    "target_logprobs": dict(
                        zip(query_ids, result.target_logprobs.tolist(), strict=True)
                    ),
                    "heldout_loss": result.heldout_loss,
                    "seconds": result.seconds,
                }
                write_atomically(paths[job.index], record)
                progress.update()
                _logger.info("retrained without %s in %.0f s", owners[job.index], result.seconds)
    else:
        _logger.info("reusing the %d leave-one-owner-out retrains %s", len(owners), key)
    records = [json.loads(path.read_text()) for path in paths]
    reference = target_logprobs(bundle.model(), bundle.encode_queries(list(bundle.data.queries)))
    return OwnerEffects(
        owners=owners,
        query_ids=tuple(query_ids),
        reference=reference,
        without=np.array([[r["target_logprobs"][q] for q in query_ids] for r in records]),
        heldout_losses=np.array([r["heldout_loss"] for r in records]),
    )


@contextlib.contextmanager
def _report_interruption(paths: list[Path]):
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        stored = sum(path.is_file() for path in paths)
        _logger.warning(
            "owner retrains interrupted with %d of %d stored; the same command resumes them",
            stored, len(paths),
        )  # fmt: skip
        raise


def owner_scores(scores: np.ndarray, bundle: Bundle) -> np.ndarray:
    """Document scores summed per owner: (n_queries, n_owners) in ``bundle.data.owners`` order."""
    owners = bundle.data.owners
    membership = np.zeros((len(bundle.data.documents), len(owners)))
    for i, document in enumerate(bundle.data.documents):
        membership[i, owners.index(document.owner)] = 1.0
    return scores @ membership


def top1_hits(owner_scores: np.ndarray, true_owner: np.ndarray) -> np.ndarray:
    """Per query: 1 if the true owner alone scores highest, 1/t if it ties with t − 1 others."""
    best = owner_scores.max(axis=1, keepdims=True)
    at_top = owner_scores == best
    true_at_top = at_top[np.arange(len(true_owner)), true_owner]
    return np.where(true_at_top, 1.0 / at_top.sum(axis=1), 0.0)


def owner_metrics(
    scores: np.ndarray,
    queries: list[Query],
    bundle: Bundle,
    effects: OwnerEffects | None,
    *,
    seed: int,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """``owner_top1`` and, with the retrains, ``owner_spearman``, each with its interval."""
    per_owner = owner_scores(scores, bundle)
    per_query: dict[str, np.ndarray] = {}
    if all(q.owner is not None for q in queries):
        true_owner = np.array([bundle.data.owners.index(q.owner) for q in queries])
        per_query["owner_top1"] = top1_hits(per_owner, true_owner)
    if effects is not None:
        per_query["owner_spearman"] = rank_correlations(
            per_owner, effects.drops([q.id for q in queries])
        )
    metrics = {}
    for name, values in per_query.items():
        mean, low, high = mean_with_ci(values, seed=seed)
        metrics |= {name: mean, f"{name}_ci_low": low, f"{name}_ci_high": high}
    return metrics, per_query

"""What a run measures beyond planted ground truth: retraining effects and reliability.

- **LDS** against the task's shared subset-retrain pool (:mod:`harness.retrain`).
- **Top-k removal** (opt-in, it retrains per query): for a sample of queries,
  retrain without the query's k highest-scored documents and, separately,
  without k random ones; the mean drop of the target's log-probability from the
  reference model's for each, and their difference. Removal retrains use the
  reference model's seed and, like every retrain, the recipe's epochs, so a
  model without k documents takes k/n fewer steps. Each drop therefore holds a
  small common part from those fewer steps; their difference,
  ``removal_effect_at_k``, compares like with like and is the figure to read.
- **Reliability**: rank stability across method seeds and model-training seeds,
  and the model-randomisation sanity check (scores recomputed on re-initialised
  weights should not resemble the trained model's; a method whose scores do not
  change at all does not use the model and is flagged, not failed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import harness
from harness.bundle import Bundle
from harness.cache import code_fingerprint, content_key
from harness.data import Query
from harness.errors import ParameterError
from harness.executor import default_executor
from harness.method import Method
from harness.metrics import lds_per_query, mean_with_ci, rank_correlations
from harness.retrain import (
    SubsetPool,
    ensure_disjoint,
    retrain_job,
    run_retrain,
    target_logprobs,
    write_atomically,
)

_logger = logging.getLogger(__name__)

# a method whose scores keep this rank correlation on a re-initialised model ignores the model
MODEL_INDEPENDENT_ABOVE = 0.999
REMOVAL_KS = (10, 50)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Which counterfactual and reliability measurements a run makes."""

    lds: bool = True
    pool_models: int = 30
    pool_fraction: float = 0.5
    reliability: bool = True
    removal: bool = False
    removal_queries: int = 4
    removal_ks: tuple[int, ...] = REMOVAL_KS
    owner_retrains: bool = True  # leave-one-owner-out retrains, on tasks with owners

    def check(self, n_documents: int | None = None) -> None:
        """Refuse settings that cannot work, naming the valid range.

        Called before anything is built and again, with the task's number of
        documents, before any retraining.
        """
        if self.lds and self.pool_models < 3:
            raise ParameterError(
                f"--pool-models must be at least 3 (LDS ranks models), but got {self.pool_models}"
            )
        if not 0.0 < self.pool_fraction < 1.0:
            raise ParameterError(
                f"--pool-fraction must lie strictly between 0 and 1, but got {self.pool_fraction}"
            )
        if self.removal_queries < 1:
            raise ParameterError(
                f"--removal-queries must be at least 1, but got {self.removal_queries}"
            )
        if not self.removal_ks or any(k < 1 for k in self.removal_ks):
            raise ParameterError(
                f"removal sizes k must be positive integers, but got {list(self.removal_ks)}"
            )
        if n_documents is None:
            return
        kept = round(self.pool_fraction * n_documents)
        if self.lds and not 0 < kept < n_documents:
            raise ParameterError(
                f"--pool-fraction {self.pool_fraction} of the task's {n_documents} documents "
                f"keeps {kept}; each pool model must keep some documents and leave some out"
            )
        if self.removal and max(self.removal_ks) >= n_documents:
            raise ParameterError(
                f"removal size {max(self.removal_ks)} must be below the task's "
                f"{n_documents} documents"
            )


# --- LDS ---------------------------------------------------------------------------


def lds_metrics(
    method: Method, scores: np.ndarray, queries: list[Query], pool: SubsetPool, *, seed: int
) -> tuple[dict[str, float], np.ndarray]:
    """``lds`` with its bootstrap interval over queries, and the per-query values.

    A method that learned from retrains says so by holding its pool as ``pool``
    (as :class:`methods.datamodel.Datamodel` does); it is then refused unless that
    pool shares no model with the one it is scored against.
    """
    own_pool = getattr(method, "pool", None)
    if isinstance(own_pool, SubsetPool):
        ensure_disjoint(own_pool, pool)
    per_query = lds_per_query(scores, pool.masks, pool.targets([q.id for q in queries]))
    mean, low, high = mean_with_ci(per_query, seed=seed)
    metrics = {"lds": mean, "lds_ci_low": low, "lds_ci_high": high, "lds_models": len(pool)}
    return metrics, per_query


# --- reliability -------------------------------------------------------------------


def reliability_metrics(
    method: Method, bundle: Bundle, queries: list[Query], scores: np.ndarray
) -> tuple[dict[str, float], dict[str, str]]:
    """Seed stability, model-seed stability and the randomisation check, with their cost."""
    started = time.perf_counter()

    def rescored(target: Bundle, seed: int) -> np.ndarray:
        other = type(method)(method.params, seed=seed)
        other.fit(target)
        return np.asarray(other.score(target, queries), dtype=np.float64)

    def mean_correlation(name: str, other: np.ndarray) -> float:
        finite = np.isfinite(other).all(axis=1)
        if not finite.all():
            _logger.warning(
                "%s: %d of %d queries had non-finite scores in the %s check; left out",
                method.name, int((~finite).sum()), len(finite), name,
            )  # fmt: skip
        if not finite.any():
            return float("nan")
        return float(rank_correlations(scores[finite], other[finite]).mean())

    metrics = {
        "seed_stability": mean_correlation("method-seed", rescored(bundle, method.seed + 1)),
        "randomization_correlation": mean_correlation(
            "randomisation", rescored(bundle.randomized(0), method.seed)
        ),
    }
    model_independent = metrics["randomization_correlation"] > MODEL_INDEPENDENT_ABOVE
    metrics["model_independent"] = float(model_independent)
    if model_independent:
        _logger.info(
            "%s gives the same ranking on a re-initialised model: it does not use the model",
            method.name,
        )
    metrics["model_seed_stability"] = mean_correlation(
        "model-seed", rescored(bundle.replica(1), method.seed)
    )
    metrics["reliability_seconds"] = time.perf_counter() - started
    return metrics, {"model_independent": str(model_independent).lower()}


# --- top-k removal -----------------------------------------------------------------


def removal_sample(bundle: Bundle, queries: Sequence[Query], count: int) -> list[int]:
    """Indices into ``queries`` of the queries removal tests, the same for every method."""
    rng = np.random.default_rng(bundle.seed)
    return sorted(rng.choice(len(queries), size=min(count, len(queries)), replace=False).tolist())


def removal_metrics(
    bundle: Bundle, queries: list[Query], scores: np.ndarray, evaluation: Evaluation
) -> dict[str, float]:
    """Mean drop of the target log-probability without the top-k documents and without k random.

    The drop is the reference model's target log-probability minus the
    retrained model's; a positive ``removal_effect_at_k`` (top-k minus random)
    means the method found documents that matter more than chance.
    """
    n_documents = len(bundle.data.documents)
    sample = removal_sample(bundle, queries, evaluation.removal_queries)
    reference = _reference_logprobs(bundle)
    requests = []  # (query position, k, kind, removed documents)
    for position in sample:
        order = np.argsort(-scores[position], kind="stable")
        for k in evaluation.removal_ks:
            requests.append((position, k, "top", np.sort(order[:k])))
            rng = np.random.default_rng([bundle.seed, position, k])
            requests.append((position, k, "random", np.sort(rng.choice(n_documents, k, False))))
    logprobs = _removal_retrains(bundle, [removed for *_, removed in requests])

    drops: dict[tuple[int, str], list[float]] = {}
    for (position, k, kind, _), values in zip(requests, logprobs, strict=True):
        query_id = queries[position].id
        drops.setdefault((k, kind), []).append(reference[query_id] - values[query_id])
    metrics = {}
    for k in evaluation.removal_ks:
        top, random = np.mean(drops[(k, "top")]), np.mean(drops[(k, "random")])
        metrics |= {
            f"removal_drop_at_{k}": float(top),
            f"removal_random_drop_at_{k}": float(random),
            f"removal_effect_at_{k}": float(top - random),
        }
    metrics["removal_queries"] = len(sample)
    return metrics


def _reference_logprobs(bundle: Bundle) -> dict[str, float]:
    queries = bundle.encode_queries(list(bundle.data.queries))
    values = target_logprobs(bundle.model(), queries)
    return dict(zip([q.id for q in bundle.data.queries], values.tolist(), strict=True))


def _removal_retrains(bundle: Bundle, removals: list[np.ndarray]) -> list[dict[str, float]]:
    """Target log-probabilities of models trained without each removal set; cached per set."""
    if bundle.cache is None:
        raise ValueError("this bundle has no cache to keep removal retrains in")
    folder = bundle.cache.root / "removals"
    folder.mkdir(parents=True, exist_ok=True)
    n_documents = len(bundle.data.documents)
    code = code_fingerprint(
        Path(harness.__file__).with_name(f) for f in ("retrain.py", "training.py", "model.py")
    )
    keys = [
        content_key(
            {"setup": bundle.setup_key, "seed": bundle.seed, "removed": r.tolist(), "code": code}
        )
        for r in removals
    ]
    missing = {key: removed for key, removed in zip(keys, removals, strict=True)}
    missing = {key: removed for key, removed in missing.items() if not (folder / key).is_file()}
    if missing:
        _logger.info(
            "top-k removal: %d retrains on all but k documents (%d already stored)",
            len(missing), len(set(keys)) - len(missing),
        )  # fmt: skip
        jobs = []
        for index, (key, removed) in enumerate(missing.items()):
            kept = np.setdiff1d(np.arange(n_documents), removed)
            job = retrain_job(bundle, index, bundle.seed, kept)
            jobs.append((key, job))
        by_index = {job.index: key for key, job in jobs}
        progress = tqdm(total=len(jobs), desc="removal retrains", unit="model", disable=None)
        with progress:
            for job, result in default_executor().run(run_retrain, [j for _, j in jobs]):
                values = dict(
                    zip(
                        [q.id for q in bundle.data.queries],
                        result.target_logprobs.tolist(),
                        strict=True,
                    )
                )
                write_atomically(folder / by_index[job.index], values)
                progress.update()
    return [json.loads((folder / key).read_text()) for key in keys]

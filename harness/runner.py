"""Run methods on a task: validate, prepare the bundle, then one tracked run per method.

Everything a user can get wrong is resolved in :func:`plan_runs` before any
data is built or any model trained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from harness.bundle import Bundle, prepare_bundle, prepare_task_data
from harness.cache import Cache
from harness.data import Query
from harness.errors import ParameterError, ScoresNotFiniteError, UnknownNameError
from harness.evaluation import Evaluation, lds_metrics, reliability_metrics, removal_metrics
from harness.method import METHODS, Method
from harness.metrics import query_metrics, summarize
from harness.owners import OwnerEffects, leave_one_owner_out, owner_metrics
from harness.resources import CostMeter
from harness.retrain import SubsetPool, build_pool
from harness.splits import QUERY_SETS, select_queries
from harness.task import TASKS, Task
from harness.tracking import (
    INPUTS_TAG,
    SETUP_TAG,
    VARIANT_TAG,
    Tracker,
    code_version,
    tracking_uri,
)
from harness.unlearning import RemovableShards, never_seen_in_pool, unlearning_metrics

_logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Validated inputs of a run: the task at a scale, and configured methods."""

    task: Task
    scale: str
    seed: int
    methods: tuple[Method, ...]
    evaluation: Evaluation = dataclasses.field(default_factory=Evaluation)
    queries: str = "all"  # which queries are scored: all, or a side of the tuning split


@dataclasses.dataclass
class GroundTruth:
    """Counterfactual ground truth shared by every method of a run."""

    pool: SubsetPool | None = None  # subset retrains, for LDS
    owners: OwnerEffects | None = None  # leave-one-owner-out retrains, on tasks with owners


@dataclasses.dataclass
class RunOutcome:
    method: str
    run_id: str | None
    status: str  # FINISHED or FAILED
    metrics: dict[str, float]
    error: str | None = None


def parse_method_names(text: str, *, task: str | None = None) -> list[str]:
    """``"all"``, one name, or a comma-separated list; each name checked against the registry.

    With a ``task``, ``"all"`` means every method that applies to it.
    """
    if text.strip() == "all":
        if task is None:
            return METHODS.names()
        task_class = TASKS.get(task)
        return [cls.name for cls in METHODS if cls.applies_to(task_class) is None]
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UnknownNameError("method", text, METHODS.names())
    for name in names:
        METHODS.get(name)
    return list(dict.fromkeys(names))


def plan_runs(
    method_names: Sequence[str],
    task_name: str,
    *,
    scale: str | None,
    seed: int,
    overrides: Mapping[str, str],
    evaluation: Evaluation | None = None,
    queries: str = "all",
    task_params: Mapping[str, str] | None = None,
) -> RunPlan:
    """Check every name and parameter; raise before any expensive work.

    ``task_params`` override the scale's task settings (``model.KEY`` its model recipe).
    """
    if isinstance(method_names, str):
        raise TypeError("method_names must be a sequence of names; use parse_method_names(text)")
    if not method_names:
        raise ValueError("select at least one method")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParameterError(f"seed must be a non-negative integer, but got {seed!r}")
    task_class = TASKS.get(task_name)
    scale = scale or task_class.default_scale
    task = task_class(task_params)
    settings = task.settings(scale)
    evaluation = evaluation or Evaluation()
    evaluation.check()
    if queries not in QUERY_SETS:
        raise UnknownNameError("query set", queries, QUERY_SETS)
    method_classes = [METHODS.get(name) for name in method_names]
    for cls in method_classes:
        reason = cls.applies_to(task_class)
        if reason is not None:
            raise ParameterError(
                f"method {cls.name!r} does not apply to task {task_name!r}: {reason}"
            )
    per_method = _split_overrides(method_classes, overrides)
    methods = tuple(
        cls(cls.Params.from_strings(per_method[cls.name]), seed=seed) for cls in method_classes
    )
    # the model's structure is known from the recipe before training: a skeleton of it
    # lets methods refuse layer selections that match nothing, without waiting minutes
    recipe = settings.recipe
    skeleton = recipe.model_config(vocab_size=16).build()
    for method in methods:
        method.check_model(skeleton, checkpoints=recipe.checkpoints)
    return RunPlan(
        task=task,
        scale=scale,
        seed=seed,
        methods=methods,
        evaluation=evaluation,
        queries=queries,
    )


def _split_overrides(
    method_classes: Sequence[type[Method]], overrides: Mapping[str, str]
) -> dict[str, dict[str, str]]:
    """Route ``KEY=VALUE`` to every selected method with that parameter; ``METHOD.KEY`` to one."""
    per_method: dict[str, dict[str, str]] = {cls.name: {} for cls in method_classes}
    for key, value in overrides.items():
        method, _, name = key.rpartition(".")
        targets = [cls for cls in method_classes if not method or cls.name == method]
        if method and not targets:
            METHODS.get(method)  # a misspelled method gets the registry's suggestions
            raise ParameterError(
                f"parameter {key!r} is for method {method!r}, which is not selected; "
                f"selected methods: {', '.join(per_method)}"
            )
        takers = [cls for cls in targets if name in {p["name"] for p in cls.Params.describe()}]
        if not takers:
            valid = sorted(
                {f"{cls.name}.{p['name']}" for cls in targets for p in cls.Params.describe()}
            )
            if not valid:
                names = [c.name for c in targets]
                raise ParameterError(
                    f"parameter {key!r} was given, but {', '.join(names)} "
                    f"{'takes' if len(names) == 1 else 'take'} no parameters"
                )
            if method:  # suggest among that method's own parameter names
                own = [v.removeprefix(f"{method}.") for v in valid]
                raise UnknownNameError("parameter", name, own, where=f"of method {method!r}")
            raise UnknownNameError("parameter", key, valid)
        for cls in takers:
            per_method[cls.name][name] = value
    return per_method


class Runner:
    """Owns the results folder: cache, MLflow store and artifacts all live under it."""

    def __init__(self, results_dir: Path, *, tracking_uri_override: str | None = None) -> None:
        self.results_dir = Path(results_dir)
        self.cache = Cache(self.results_dir / "cache")
        uri = tracking_uri(self.results_dir, tracking_uri_override)
        local = uri.startswith(("sqlite:", "file:"))
        self.tracker = Tracker(
            uri, artifact_root=self.results_dir / "artifacts" if local else None
        )

    def execute(self, plan: RunPlan) -> list[RunOutcome]:
        bundle, truth = self.prepare(plan)
        return [self.run_method(method, plan, bundle, truth) for method in plan.methods]

    def prepare(self, plan: RunPlan) -> tuple[Bundle, GroundTruth]:
        """Check the plan against the task's data, then build the bundle and ground truth."""
        # an unreachable tracking store fails now, not after minutes of training
        self.tracker.experiment_id(plan.task.name)
        # settings that depend on the number of documents are checked before training
        data = prepare_task_data(plan.task, plan.scale, seed=plan.seed, cache=self.cache)
        plan.evaluation.check(len(data.documents))
        for method in plan.methods:
            method.check_task(data)
        bundle = prepare_bundle(plan.task, plan.scale, seed=plan.seed, cache=self.cache)
        return bundle, self.ground_truth(bundle, plan.evaluation)

    @staticmethod
    def ground_truth(bundle: Bundle, evaluation: Evaluation) -> GroundTruth:
        """What every method is measured against, built once before any method runs."""
        truth = GroundTruth()
        if evaluation.lds:
            truth.pool = build_pool(
                bundle, "lds", models=evaluation.pool_models, fraction=evaluation.pool_fraction
            )
        if bundle.data.owners and evaluation.owner_retrains:
            truth.owners = leave_one_owner_out(bundle)
        return truth

    def run_method(
        self,
        method: Method,
        plan: RunPlan,
        bundle: Bundle,
        truth: GroundTruth,
        *,
        tags: Mapping[str, str] | None = None,
    ) -> RunOutcome:
        """One tracked run of a fitted-and-scored method; ``tags`` are added to the run's."""
        variant = plan.task.variant(plan.scale)
        name = f"{method.name}-{plan.task.label(plan.scale)}-{plan.scale}-seed{plan.seed}"
        if plan.queries != "all":
            name += f"-{plan.queries}"
        tags = {
            **(tags or {}),
            "queries": plan.queries,
            "method": method.name,
            "family": method.family,
            "task": plan.task.name,
            "scale": plan.scale,
            VARIANT_TAG: variant,
            INPUTS_TAG: plan.task.inputs_fingerprint(plan.scale),
            SETUP_TAG: plan.task.setup_key(plan.scale),
            "code_version": code_version(),
            "data_hash": bundle.data.fingerprint(),
            "model_key": bundle.model_key,
        }
        _logger.info("running %s on %s/%s", method.name, plan.task.label(plan.scale), plan.scale)
        try:
            with self.tracker.run(task=plan.task.name, name=name, tags=tags) as run:
                run.log_params(_run_params(method, plan, bundle))
                queries = [
                    q
                    for q in select_queries(bundle.data.queries, plan.queries, seed=plan.seed)
                    if bundle.learned[q.id]
                ]
                model_metrics = plan.task.model_metrics(bundle)
                run.log_metrics(model_metrics)
                metrics = _evaluate(
                    method, bundle, queries, run, plan.evaluation, truth, query_set=plan.queries
                )
                metrics |= model_metrics
        except Exception as error:  # recorded in MLflow; the next method still runs
            return RunOutcome(method.name, None, "FAILED", {}, f"{type(error).__name__}: {error}")
        _logger.info(
            "%s finished in %.1f s: MRR %.3f (run %s)",
            method.name,
            metrics["fit_seconds"] + metrics["score_seconds"],
            metrics["mrr"],
            run.run_id,
        )
        return RunOutcome(method.name, run.run_id, "FINISHED", metrics)


def _run_params(method: Method, plan: RunPlan, bundle: Bundle) -> dict[str, object]:
    params: dict[str, object] = {
        "method": method.name,
        "task": plan.task.name,
        "scale": plan.scale,
        "seed": plan.seed,
        "queries": plan.queries,
    }
    params |= {f"method.{k}": v for k, v in method.params.to_dict().items()}
    params |= {f"model.{k}": v for k, v in bundle.recipe.to_dict().items()}
    params |= {f"task.{k}": v for k, v in plan.task.settings(plan.scale).config.to_dict().items()}
    evaluation = plan.evaluation
    if evaluation.lds:
        params |= {"lds.pool_models": evaluation.pool_models}
        params |= {"lds.pool_fraction": evaluation.pool_fraction}
    if evaluation.removal:
        params |= {"removal.queries": evaluation.removal_queries}
        params |= {"removal.ks": ",".join(map(str, evaluation.removal_ks))}
    return params


def _evaluate(
    method: Method,
    bundle: Bundle,
    queries: list[Query],
    run,
    evaluation: Evaluation,
    truth: GroundTruth,
    *,
    query_set: str = "all",
) -> dict[str, float]:
    """Score the learned ``queries`` and log every metric group as soon as it exists."""
    task_metrics = {
        "queries_total": len(bundle.data.queries),
        "queries_scored": len(queries),
        "learned_fraction": sum(bundle.learned.values()) / len(bundle.data.queries),
        "learned_fraction_untrained": bundle.learned_fraction_untrained,
        "heldout_loss": bundle.heldout_loss,
    }
    run.log_metrics(task_metrics)
    if not queries:
        chosen = len(select_queries(bundle.data.queries, query_set, seed=bundle.seed))
        raise ValueError(
            f"the model learned none of the {chosen} queries in the query set scored "
            f"({query_set}); there is nothing to attribute (train longer or use a larger scale)"
        )

    with CostMeter() as fit_cost:
        method.fit(bundle)
    with CostMeter() as score_cost:
        scores = np.asarray(method.score(bundle, queries), dtype=np.float64)
    shape = (len(queries), len(bundle.data.documents))
    failed = _failed_queries(method, scores, shape)
    if failed:
        run.log_metrics({"failed_queries": failed})
        _raise_not_finite(method, scores, queries, failed)

    index = {doc_id: i for i, doc_id in enumerate(bundle.data.document_ids)}
    relevant = [[index[doc_id] for doc_id in query.relevant] for query in queries]
    per_query = query_metrics(scores, relevant, seed=bundle.seed)
    metrics = {
        **summarize(per_query, seed=bundle.seed),
        "fit_seconds": fit_cost.seconds,
        "score_seconds": score_cost.seconds,
        "peak_memory_mb": max(fit_cost.peak_memory_mb, score_cost.peak_memory_mb),
        "failed_queries": 0,
    }
    # each group is logged as soon as it exists: a crash later keeps it in the run
    run.log_metrics(metrics)
    if truth.pool is not None:
        lds, per_query["lds"] = lds_metrics(method, scores, queries, truth.pool, seed=bundle.seed)
        run.log_metrics(lds)
        metrics |= lds
    if bundle.data.owners:
        owners, owner_columns = owner_metrics(
            scores, queries, bundle, truth.owners, seed=bundle.seed
        )
        run.log_metrics(owners)
        metrics |= owners
        per_query |= owner_columns
    if method.trains_own_model:
        own = _own_model_metrics(method, bundle, queries, truth)
        run.log_metrics(own)
        metrics |= own
    _log_artifacts(run, scores, queries, per_query, method, bundle)
    if evaluation.reliability:
        reliability, tags = reliability_metrics(method, bundle, queries, scores)
        run.log_metrics(reliability)
        run.set_tags(tags)
        metrics |= reliability
    if evaluation.removal:
        removal = removal_metrics(bundle, queries, scores, evaluation)
        run.log_metrics(removal)
        metrics |= removal
    return {**task_metrics, **metrics}


def _own_model_metrics(
    method: Method, bundle: Bundle, queries: list[Query], truth: GroundTruth
) -> dict[str, float]:
    """Held-out loss of the method's own model against the reference's; the unlearning check."""
    own_loss = method.own_heldout_loss(bundle)
    metrics = {"own_heldout_loss": own_loss, "heldout_loss_delta": own_loss - bundle.heldout_loss}
    if method.own_train_seconds is not None:  # cached models make fit_seconds small
        metrics["own_train_seconds"] = method.own_train_seconds
    if isinstance(method, RemovableShards):
        if truth.owners is not None and all(q.owner for q in queries):
            never_seen = truth.owners.without_owner(
                [q.id for q in queries], [q.owner for q in queries]
            )
            reference = dict(zip([q.id for q in queries], never_seen.tolist(), strict=True))
        elif truth.pool is not None:
            reference = never_seen_in_pool(truth.pool, bundle, queries)
        else:
            reference = None
        metrics |= unlearning_metrics(method, bundle, queries, never_seen=reference)
    return metrics


def _failed_queries(method: Method, scores: np.ndarray, shape: tuple[int, int]) -> int:
    """Rows with a NaN or infinite score; a wrong shape is an error of its own."""
    if scores.shape != shape:
        raise ValueError(
            f"{method.name}.score must return shape {shape} "
            f"(queries × documents), but returned {scores.shape}"
        )
    return int((~np.isfinite(scores)).any(axis=1).sum())


def _raise_not_finite(
    method: Method, scores: np.ndarray, queries: list[Query], failed: int
) -> None:
    first = int(np.argmax((~np.isfinite(scores)).any(axis=1)))
    column = int(np.argmax(~np.isfinite(scores[first])))
    raise ScoresNotFiniteError(
        f"{method.name} produced NaN or infinite scores for {failed} of {len(queries)} "
        f"queries; the first is {queries[first].id!r} (prompt {queries[first].prompt!r}), "
        f"score {scores[first, column]} for document {column}"
    )


def _log_artifacts(
    run,
    scores: np.ndarray,
    queries: list[Query],
    per_query: dict[str, np.ndarray],
    method: Method,
    bundle: Bundle,
) -> None:
    table = pl.DataFrame(
        {
            "query_id": [q.id for q in queries],
            "prompt": [q.prompt for q in queries],
            "target": [q.target for q in queries],
            "n_relevant": [len(q.relevant) for q in queries],
            **{name: values for name, values in per_query.items()},
        }
    )
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        np.save(folder / "scores.npy", scores.astype(np.float32))  # queries × documents
        table.write_csv(folder / "per_query.csv")
        (folder / "method.json").write_text(
            json.dumps(
                {
                    "method": method.name,
                    "family": method.family,
                    "params": method.params.to_dict(),
                    "rows": [q.id for q in queries],
                    "columns": bundle.data.document_ids,
                },
                indent=2,
            )
        )
        # every query of the task, scored or not: whether the model learned its target
        (folder / "learned.json").write_text(json.dumps(bundle.learned, indent=1))
        for path in sorted(folder.iterdir()):
            run.log_artifact(path)

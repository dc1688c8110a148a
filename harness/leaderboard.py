"""Collect finished MLflow runs into a polars table and rank methods per task.

Only FINISHED runs are read: a failed run (an error, or NaN scores) is never
ranked (its ``failed_queries`` count stays in its MLflow run). A row is one
configuration: a method with its parameters, on a task at a scale with its task
settings and model recipe (``setup``, a hash of both; ``variant`` names the
settings a run overrode, such as ``paraphrase=true``).
Parameters that change only memory use (declared ``memory_only=True``) do not split
rows. Runs of a configuration with different seeds are pooled, and a repeated
run of the same seed counts once: each metric from the latest run that has it,
so a later run with LDS or reliability switched off keeps the earlier figures.

Intervals: with one seed (for that metric), a metric's ``_ci_low``/``_ci_high``
are the run's own bootstrap interval over queries; with several seeds they are a
Student-t 95% interval of the mean over the seeds that have the metric.
``ci_basis`` says which. ``lds_models`` is the size of the pool behind ``lds``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import polars as pl
from mlflow.entities import ViewType
from scipy import stats

from harness.cache import content_key
from harness.errors import UnknownNameError
from harness.evaluation import REMOVAL_KS
from harness.method import METHODS
from harness.metrics import CONFIDENCE, SUMMARY_NAMES
from harness.task import TASKS
from harness.tracking import (
    INPUTS_TAG,
    ROLE_TAG,
    SETUP_TAG,
    TASK_TAG,
    VARIANT_TAG,
    open_client,
)

_logger = logging.getLogger(__name__)

FIDELITY = [*SUMMARY_NAMES.values(), "lds", "owner_top1", "owner_spearman"]
INTERVALS = [f"{name}{suffix}" for name in FIDELITY for suffix in ("_ci_low", "_ci_high")]
REMOVAL = [
    f"removal_{kind}_at_{k}" for k in REMOVAL_KS for kind in ("drop", "random_drop", "effect")
]
RELIABILITY = [
    "seed_stability", "model_seed_stability", "randomization_correlation", "model_independent",
    "failed_queries",
]  # fmt: skip
# methods that train their own model: its utility, and the exact-removal check
OWN_MODEL = ["own_heldout_loss", "heldout_loss_delta", "own_train_seconds"]
UNLEARNING = [
    "unlearn_queries", "unlearn_forgotten", "unlearn_kept_other", "unlearn_logprob_full",
    "unlearn_logprob_without_responsible", "unlearn_logprob_without_other",
    "unlearn_never_seen_queries", "unlearn_logprob_never_seen", "unlearn_gap_never_seen",
    "unlearn_not_removable",
]  # fmt: skip
COST = ["fit_seconds", "score_seconds", "peak_memory_mb", "reliability_seconds"]
CONTEXT = ["queries_scored", "learned_fraction", "learned_fraction_untrained", "heldout_loss"]
POOL = ["lds_models"]  # retrained models behind the LDS figure
OTHER = POOL + REMOVAL + RELIABILITY + OWN_MODEL + UNLEARNING + COST + CONTEXT
METRICS = FIDELITY + INTERVALS + OTHER
# ``queries``: all, or the held-out half of a sweep's split; ``selection``: for a sweep's
# held-out runs, whether the configuration is the study's best or the method's default
CONFIGURATION = ["task", "scale", "variant", "setup", "queries", "method", "params", "selection"]
# rows are ranked against the others of the same task, scale, variant, setup and query set
RANKED_WITHIN = ["task", "scale", "variant", "setup", "queries"]
EXCLUDED_ROLES = ("sweep", "trial")  # a study's parent run and its trials: tuning, not results
RANK_BY = "mrr"


def collect_runs(uri: str, *, tasks: Sequence[str] = ()) -> pl.DataFrame:
    """One row per finished harness run: its configuration, seed, start time and metrics."""
    client = open_client(uri)
    experiments = [
        e
        for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
        if TASK_TAG in e.tags and (not tasks or e.tags[TASK_TAG] in tasks)
    ]
    rows = []
    for experiment in experiments:
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            max_results=50_000,
        )
        rows += [
            _run_row(experiment.tags[TASK_TAG], run)
            for run in runs
            if run.data.tags.get(ROLE_TAG) not in EXCLUDED_ROLES
        ]
    schema = {
        "task": pl.String,
        "scale": pl.String,
        "variant": pl.String,
        "setup": pl.String,
        "queries": pl.String,
        "method": pl.String,
        "params": pl.String,
        "selection": pl.String,
        "seed": pl.Int64,
        "run_id": pl.String,
        "start_time": pl.Int64,
        **{m: pl.Float64 for m in METRICS},
    }
    return pl.DataFrame(rows, schema=schema)


def _run_row(task: str, run) -> dict:
    params = run.data.params
    method = run.data.tags.get("method")
    ignored = _memory_only_params(method)
    method_params = {
        key.removeprefix("method."): value
        for key, value in params.items()
        if key.startswith("method.") and key.removeprefix("method.") not in ignored
    }
    setup = run.data.tags.get(SETUP_TAG)
    if setup is None:  # a run from before the tag: its logged settings, files by path
        settings = {k: v for k, v in params.items() if k.startswith(("model.", "task."))}
        inputs = run.data.tags.get(INPUTS_TAG, "")
        if inputs:  # the same file paths with other contents are another setup
            settings["inputs"] = inputs
        setup = content_key(settings)
    return {
        "task": task,
        "scale": run.data.tags.get("scale"),
        "variant": run.data.tags.get(VARIANT_TAG, ""),
        "setup": setup[:8],
        "queries": run.data.tags.get("queries", "all"),
        "method": method,
        "params": json.dumps(method_params, sort_keys=True),
        "selection": run.data.tags.get("selection", ""),
        "seed": int(params.get("seed", 0)),
        "run_id": run.info.run_id,
        "start_time": run.info.start_time,
        **{m: run.data.metrics.get(m) for m in METRICS},
    }


def _memory_only_params(method: str | None) -> set[str]:
    try:
        declared = METHODS.get(method or "").Params.describe()
    except UnknownNameError:  # a plugin no longer installed: keep every parameter
        return set()
    return {p["name"] for p in declared if p.get("memory_only")}


def build_leaderboard(runs: pl.DataFrame) -> pl.DataFrame:
    """One row per configuration, ranked within each task and scale by its primary metric."""
    # per (configuration, seed), each metric from the latest run that has it: a later
    # run with LDS or reliability switched off does not erase the earlier figures
    latest = (
        runs.sort("start_time")
        .group_by([*CONFIGURATION, "seed"], maintain_order=True)
        .agg(*[pl.col(m).drop_nulls().last() for m in METRICS])
    )
    table = latest.group_by(CONFIGURATION).agg(
        pl.len().cast(pl.Int64).alias("n_runs"),
        pl.col("seed").sort().cast(pl.String).str.join(" ").alias("seeds"),
        *[pl.col(m).mean() for m in FIDELITY + OTHER],
        *[pl.col(m).std().alias(f"{m}_std") for m in FIDELITY],
        *[pl.col(m).count().alias(f"{m}_n") for m in FIDELITY],
        *[pl.col(m).drop_nulls().first().alias(f"{m}_single") for m in INTERVALS],
    )
    one_seed = pl.col("n_runs") == 1
    table = table.with_columns(
        pl.when(one_seed).then(pl.lit("queries")).otherwise(pl.lit("seeds")).alias("ci_basis"),
        *[_interval(m, side, sign) for m in FIDELITY for side, sign in SIDES],
    )
    # each task ranks by its primary metric; NaN and missing values rank last, never first
    primary = {task: primary_metric(task) for task in table["task"].unique().to_list()}
    key = pl.lit(None, dtype=pl.Float64)
    for task, metric in primary.items():
        key = pl.when(pl.col("task") == task).then(pl.col(metric)).otherwise(key)
    key = pl.when(key.is_nan()).then(None).otherwise(key)
    table = table.with_columns(
        key.rank(method="min", descending=True).over(*RANKED_WITHIN).alias("rank")
    )
    ordered = [*RANKED_WITHIN, "rank", "method", "selection", "params", "n_runs", "seeds"]
    ordered += ["ci_basis"]
    ordered += [f"{m}{s}" for m in FIDELITY for s in ("", "_ci_low", "_ci_high")]
    ordered += OTHER
    return table.select(ordered).sort(
        *RANKED_WITHIN, "rank", "method", "selection", nulls_last=True
    )


SIDES = (("_ci_low", -1), ("_ci_high", 1))


def primary_metric(task: str) -> str:
    """The metric a task ranks by (``mrr`` for a task plugin no longer installed)."""
    try:
        metric = TASKS.get(task).primary_metric
    except UnknownNameError:
        return RANK_BY
    return metric if metric in FIDELITY else RANK_BY


def _interval(metric: str, side: str, sign: int) -> pl.Expr:
    """One seed with the metric: its run's own interval; several: Student-t over them."""
    n = pl.col(f"{metric}_n")
    t = n.map_elements(_t_quantile, return_dtype=pl.Float64)
    spread = sign * t * pl.col(f"{metric}_std") / n.cast(pl.Float64).sqrt()
    return (
        pl.when(n <= 1)
        .then(pl.col(f"{metric}{side}_single"))
        .otherwise(pl.col(metric) + spread)
        .alias(f"{metric}{side}")
    )


def _t_quantile(n: int) -> float:
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) if n > 1 else float("nan")


def write_leaderboard(uri: str, out: Path, *, tasks: Sequence[str] = ()) -> pl.DataFrame:
    table = build_leaderboard(collect_runs(uri, tasks=tasks))
    out.parent.mkdir(parents=True, exist_ok=True)
    table.write_csv(out)
    _logger.info("wrote %d leaderboard rows to %s", table.height, out)
    return table


# --- the terminal's view ---------------------------------------------------------------

# shown beside the primary metric when a group has them; the CSV holds everything
SHOWN_RELIABILITY = ["seed_stability", "model_seed_stability", "randomization_correlation"]
SHOWN_COST = ["heldout_loss_delta", "score_seconds"]
PARAMS_WIDTH = 36


def terminal_tables(table: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    """The leaderboard as a terminal shows it: one narrow table per ranked group.

    Each group (task, scale, variant, setup, query set) gets a title naming it and
    the metric it is ranked by, then rank, method, the parameters that differ from
    the method's defaults, the primary metric with its 95% interval, and only those
    other fidelity, reliability and cost columns that some row of the group has.
    """
    views = []
    groups = table.group_by(RANKED_WITHIN, maintain_order=True)
    # the setup hash is shown only where two groups would otherwise read the same
    named = table.select("task", "scale", "variant", "queries", "setup").unique()
    ambiguous = named.height > named.select("task", "scale", "variant", "queries").n_unique()
    for keys, group in groups:
        task, scale, variant, setup, queries = keys
        primary = primary_metric(str(task))
        title = f"{task} · scale {scale}"
        title += f" · {variant}" if variant else ""
        title += f" · setup {setup}" if ambiguous else ""
        title += f" · {queries} queries · ranked by {primary}"
        columns = [
            pl.col("rank"),
            pl.col("method"),
            pl.struct("method", "params")
            .map_elements(_changed_params, return_dtype=pl.String)
            .alias("params"),
            pl.col("seeds").alias("seed(s)"),
            _shown(primary),
            pl.format("[{}, {}]", *[_shown(f"{primary}{side}") for side, _ in SIDES]).alias(
                "95% interval"
            ),
        ]
        if (group["selection"] != "").any():
            columns.insert(2, pl.col("selection"))
        others = [m for m in FIDELITY if m != primary] + SHOWN_RELIABILITY + SHOWN_COST
        columns += [_shown(m) for m in others if group[m].is_not_null().any()]
        views.append((title, group.select(columns)))
    return views


def _shown(metric: str) -> pl.Expr:
    """Three decimals, and a blank where a row has no value."""
    text = pl.col(metric).map_elements(lambda v: f"{v:.3f}", return_dtype=pl.String)
    return text.fill_null("").alias(metric)


def _changed_params(row: dict) -> str:
    """``key=value`` for each parameter that differs from the method's default, abridged."""
    values = json.loads(row["params"])
    try:
        defaults = METHODS.get(row["method"]).Params().to_dict()
    except UnknownNameError:  # a plugin no longer installed: show every parameter
        defaults = {}
    changed = [f"{k}={v}" for k, v in values.items() if str(defaults.get(k, object())) != v]
    text = " ".join(changed) or "defaults"
    return text if len(text) <= PARAMS_WIDTH else text[: PARAMS_WIDTH - 1] + "…"

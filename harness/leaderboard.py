"""Collect finished MLflow runs into a polars table and rank methods per task.

Only FINISHED runs are read: a failed run (an error, or NaN scores) is never
ranked. Each row is one (task, scale, method); metric columns are means over
that method's finished runs, and ``n_runs`` says how many there were.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import polars as pl
from mlflow.entities import ViewType

from harness.metrics import SUMMARY_NAMES
from harness.tracking import TASK_TAG, open_client

_logger = logging.getLogger(__name__)

FIDELITY = [
    f"{name}{suffix}" for name in SUMMARY_NAMES.values() for suffix in ("", "_ci_low", "_ci_high")
]
COST = ["fit_seconds", "score_seconds", "peak_memory_mb"]
CONTEXT = ["queries_scored", "learned_fraction", "heldout_loss"]
METRICS = FIDELITY + COST + CONTEXT
RANK_BY = "mrr"


def collect_runs(uri: str, *, tasks: Sequence[str] = ()) -> pl.DataFrame:
    """One row per finished harness run: task, scale, method, run_id and every metric."""
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
        for run in runs:
            rows.append(
                {
                    "task": experiment.tags[TASK_TAG],
                    "scale": run.data.tags.get("scale"),
                    "method": run.data.tags.get("method"),
                    "run_id": run.info.run_id,
                    **{m: run.data.metrics.get(m) for m in METRICS},
                }
            )
    schema = {
        "task": pl.String,
        "scale": pl.String,
        "method": pl.String,
        "run_id": pl.String,
        **{m: pl.Float64 for m in METRICS},
    }
    return pl.DataFrame(rows, schema=schema)


def build_leaderboard(runs: pl.DataFrame) -> pl.DataFrame:
    """Mean of each metric per (task, scale, method), ranked by MRR within a task and scale."""
    table = (
        runs.group_by("task", "scale", "method")
        .agg(pl.len().alias("n_runs"), *[pl.col(m).mean() for m in METRICS])
        .with_columns(pl.col("n_runs").cast(pl.Int64))
    )
    # NaN and missing values rank last, never first
    key = pl.when(pl.col(RANK_BY).is_nan()).then(None).otherwise(pl.col(RANK_BY))
    table = table.with_columns(
        key.rank(method="min", descending=True).over("task", "scale").alias("rank")
    )
    ordered = ["task", "scale", "rank", "method", "n_runs", *METRICS]
    return table.select(ordered).sort("task", "scale", "rank", "method", nulls_last=True)


def write_leaderboard(uri: str, out: Path, *, tasks: Sequence[str] = ()) -> pl.DataFrame:
    table = build_leaderboard(collect_runs(uri, tasks=tasks))
    out.parent.mkdir(parents=True, exist_ok=True)
    table.write_csv(out)
    _logger.info("wrote %d leaderboard rows to %s", table.height, out)
    return table

"""Figures of a leaderboard: fidelity against cost, a method × task heatmap, bars with CIs.

Each figure reads the leaderboard table (:func:`harness.leaderboard.build_leaderboard`)
and plots every task by its own primary metric. Rows scored on a sweep's held-out
queries are plotted apart from rows scored on all queries (their ``queries``
column), since the two are different query sets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import seaborn as sns

from harness.leaderboard import primary_metric

_logger = logging.getLogger(__name__)


def _labelled(table: pl.DataFrame) -> pl.DataFrame:
    """One value column (the task's primary metric) and a short label per row."""
    rows = []
    for row in table.iter_rows(named=True):
        metric = primary_metric(row["task"])
        value = row.get(metric)
        if value is None or np.isnan(value):
            continue
        label = row["method"] + (f" ({row['selection']})" if row.get("selection") else "")
        rows.append(
            {
                # each variant and query set is a task of its own in every figure
                "task": f"{row['task']}/{row['scale']}"
                + (f" [{row['variant']}]" if row.get("variant") else "")
                + ("" if row["queries"] == "all" else f" [{row['queries']}]"),
                "metric": metric,
                "configuration": label,
                "value": value,
                "low": row.get(f"{metric}_ci_low"),
                "high": row.get(f"{metric}_ci_high"),
                "seconds": (row.get("fit_seconds") or 0.0) + (row.get("score_seconds") or 0.0),
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "task": pl.String, "metric": pl.String, "configuration": pl.String,
            "value": pl.Float64, "low": pl.Float64, "high": pl.Float64, "seconds": pl.Float64,
        },
    )  # fmt: skip


def pareto_front(seconds: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both cost (lower) and fidelity (higher)."""
    order = np.lexsort((-value, seconds))  # cheapest first, best first among equal cost
    front, best = [], -np.inf
    for i in order:
        if value[i] > best:
            front.append(i)
            best = value[i]
    return np.array(front, dtype=np.int64)


def write_plots(table: pl.DataFrame, folder: Path) -> list[Path]:
    """Write the three figures as PNG files in ``folder``; return their paths."""
    data = _labelled(table)
    if data.is_empty():
        raise ValueError("the leaderboard has no finished run with its task's primary metric")
    folder.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid", context="paper")
    paths = [
        _fidelity_cost(data, folder / "fidelity_vs_cost.png"),
        _heatmap(data, folder / "method_task_heatmap.png"),
        _bars(data, folder / "primary_metric_bars.png"),
    ]
    for path in paths:
        _logger.info("wrote %s", path)
    return paths


def _fidelity_cost(data: pl.DataFrame, path: Path) -> Path:
    tasks = data["task"].unique(maintain_order=True).to_list()
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        part = data.filter(pl.col("task") == task)
        seconds = np.maximum(part["seconds"].to_numpy(), 1e-3)  # a log axis needs > 0
        value = part["value"].to_numpy()
        sns.scatterplot(x=seconds, y=value, hue=part["configuration"].to_list(), ax=axis, s=60)
        front = pareto_front(seconds, value)
        axis.plot(seconds[front], value[front], "k--", linewidth=1, label="Pareto front")
        axis.set(xscale="log", xlabel="fit + score seconds", ylabel=part["metric"][0], title=task)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _heatmap(data: pl.DataFrame, path: Path) -> Path:
    # the best row of each method on each task
    best = data.group_by("task", "configuration").agg(pl.col("value").max())
    wide = best.pivot(on="task", index="configuration", values="value").sort("configuration")
    matrix = wide.drop("configuration").to_numpy().astype(float)
    tasks = wide.columns[1:]
    figure, axis = plt.subplots(figsize=(2 + 1.6 * len(tasks), 1 + 0.4 * wide.height))
    sns.heatmap(
        matrix,
        annot=True,
        fmt=".3f",
        cmap="viridis",
        xticklabels=tasks,
        yticklabels=wide["configuration"].to_list(),
        ax=axis,
        cbar_kws={"label": "primary metric of the task"},
    )
    axis.set(xlabel="task", ylabel="method")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _bars(data: pl.DataFrame, path: Path) -> Path:
    tasks = data["task"].unique(maintain_order=True).to_list()
    figure, axes = plt.subplots(
        len(tasks), 1, figsize=(7, 0.5 + 0.35 * data.height + len(tasks)), squeeze=False
    )
    for axis, task in zip(axes[:, 0], tasks, strict=True):
        part = data.filter(pl.col("task") == task).sort("value", descending=True)
        value = part["value"].to_numpy()
        low = part["low"].fill_null(np.nan).to_numpy()
        high = part["high"].fill_null(np.nan).to_numpy()
        errors = np.vstack([np.nan_to_num(value - low), np.nan_to_num(high - value)])
        positions = np.arange(part.height)
        axis.barh(positions, value, xerr=errors, color=sns.color_palette()[0], capsize=3)
        axis.set_yticks(positions, part["configuration"].to_list())
        axis.invert_yaxis()
        axis.set(xlabel=f"{part['metric'][0]} with 95% CI", title=task)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

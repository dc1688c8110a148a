"""How alike two methods rank the documents: mean per-query Spearman ρ and top-10 overlap.

Reads the score matrices the latest finished run of each method stored in
MLflow (``scores.npy``, with ``method.json`` naming its rows), on one task,
scale and variant, and compares them on the queries every run scored. Nothing
is trained or scored again::

    python benchmarks/method_agreement.py --task facts --methods bm25,tfidf,ngram
    python benchmarks/method_agreement.py --task facts --variant paraphrase=true \\
        --methods bm25,tfidf
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

from harness.tracking import ROLE_TAG, VARIANT_TAG, open_client, tracking_uri

TOP = 10
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def latest_scores(client, experiment_id: str, method: str, scale: str, variant: str):
    """(row query ids, scores) of the method's latest finished all-query run, or the
    variants the method's runs do have."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'FINISHED' and tags.method = '{method}' "
        f"and tags.scale = '{scale}'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        tags = run.data.tags
        if tags.get(VARIANT_TAG, "") != variant or tags.get(ROLE_TAG) in ("sweep", "trial"):
            continue
        if tags.get("queries", "all") != "all":
            continue
        with tempfile.TemporaryDirectory() as folder:
            rows = json.loads(
                Path(client.download_artifacts(run.info.run_id, "method.json", folder)).read_text()
            )["rows"]
            path = client.download_artifacts(run.info.run_id, "scores.npy", folder)
            return rows, np.load(path, allow_pickle=False)
    return sorted({run.data.tags.get(VARIANT_TAG, "") for run in runs})


def agreement(first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """Mean over rows of Spearman's ρ, and of the shared share of the top-10 documents."""
    rhos, overlaps = [], []
    for a, b in zip(first, second, strict=True):
        with warnings.catch_warnings():  # a constant row is expected (a method found nothing)
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            rho = stats.spearmanr(a, b).statistic
        rhos.append(0.0 if np.isnan(rho) else rho)  # a constant row agrees with nothing
        top_a, top_b = set(np.argsort(-a)[:TOP]), set(np.argsort(-b)[:TOP])
        overlaps.append(len(top_a & top_b) / TOP)
    return float(np.mean(rhos)), float(np.mean(overlaps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="facts")
    parser.add_argument("--scale", default="small")
    parser.add_argument("--variant", default="", help="the task variant, e.g. paraphrase=true")
    parser.add_argument("--methods", required=True, help="comma-separated, at least two")
    parser.add_argument("--results-dir", type=Path, default=Path("results"))
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if len(methods) < 2:
        parser.error(f"--methods needs at least two methods, got {args.methods!r}")

    client = open_client(tracking_uri(args.results_dir, args.tracking_uri))
    experiment = client.get_experiment_by_name(args.task)
    if experiment is None:
        parser.error(f"no runs of task {args.task!r} in {args.results_dir}")
    found = {}
    for method in methods:
        stored = latest_scores(client, experiment.experiment_id, method, args.scale, args.variant)
        if isinstance(stored, list):
            parser.error(
                f"no finished run of {method!r} on {args.task}/{args.scale} "
                f"variant {args.variant or '(preset)'!r}; its runs have the variants "
                f"{[v or '(preset)' for v in stored]}"
            )
        found[method] = dict(zip(stored[0], stored[1], strict=True))
    shared = sorted(set.intersection(*(set(rows) for rows in found.values())))
    if not shared:
        parser.error("the runs share no scored query")
    variant = f" [{args.variant}]" if args.variant else ""
    print(f"{args.task}/{args.scale}{variant}: {len(shared)} queries scored by every run")
    print(f"{'pair':<24} {'spearman':>9} {'top-10 overlap':>15}")
    for i, first in enumerate(methods):
        for second in methods[i + 1 :]:
            rho, overlap = agreement(
                np.stack([found[first][q] for q in shared]),
                np.stack([found[second][q] for q in shared]),
            )
            print(f"{first + ' / ' + second:<24} {rho:>9.3f} {overlap:>15.3f}")


if __name__ == "__main__":
    main()

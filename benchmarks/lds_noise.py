"""How LDS noise shrinks with the number of retrained models in the pool.

Reads the latest finished run of each method on a task (its stored scores)
and the task's LDS pool, then recomputes every method's LDS on m pool models
drawn with replacement (a bootstrap over models), for several m. The spread
over draws estimates the noise a pool of m models leaves in the figure. Trains
nothing: the pool must already hold the models (run ``harness run`` first).

    python benchmarks/lds_noise.py --task facts --pool-models 30
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl
from stored import add_task_arguments, size_list, stored_bundle, stored_pool

from harness.leaderboard import collect_runs
from harness.metrics import lds_per_query
from harness.tracking import open_client, tracking_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_task_arguments(parser)
    parser.add_argument("--pool-models", type=int, default=30)
    parser.add_argument("--pool-fraction", type=float, default=0.5)
    parser.add_argument(
        "--sizes",
        type=size_list(3, "LDS ranks models"),
        default="5,10,15,20,30",
        help="pool sizes m to compare",
    )
    parser.add_argument("--draws", type=int, default=200, help="bootstrap draws per size")
    args = parser.parse_args()

    bundle = stored_bundle(parser, args)
    scale = bundle.scale
    pool = stored_pool(parser, bundle, "lds", models=args.pool_models, fraction=args.pool_fraction)
    # bootstrap draws may exceed the pool, but not by much: beyond it they say little
    if max(args.sizes) > len(pool):
        parser.error(f"--sizes {max(args.sizes)} exceeds the pool's {len(pool)} models")
    uri = tracking_uri(args.results_dir)
    runs = (
        collect_runs(uri, tasks=[args.task])
        .filter(
            (pl.col("scale") == scale)
            & (pl.col("seed") == args.seed)
            & (pl.col("lds").is_not_null())
        )
        .sort("start_time")
        .unique("method", keep="last")
        .sort("method")
    )
    client = open_client(uri)
    sizes = args.sizes
    rng = np.random.default_rng(0)
    draws = {m: [rng.choice(len(pool), m, replace=True) for _ in range(args.draws)] for m in sizes}
    print(
        f"LDS of each method's latest {args.task}/{scale} run against m of the "
        f"{len(pool)} pool models: mean ± standard deviation over {args.draws} bootstrap "
        "draws of m models"
    )
    print("| method | " + " | ".join(f"m = {m}" for m in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for row in runs.iter_rows(named=True):
        folder = client.download_artifacts(row["run_id"], "")
        scores = np.load(Path(folder) / "scores.npy", allow_pickle=False).astype(np.float64)
        query_ids = json.loads((Path(folder) / "method.json").read_text())["rows"]
        targets = pool.targets(query_ids)
        cells = []
        for m in sizes:
            values = [
                lds_per_query(scores, pool.masks[subset], targets[subset]).mean()
                for subset in draws[m]
            ]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}")
        print(f"| {row['method']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

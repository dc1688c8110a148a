"""How datamodels improve with the number of retrained models they learn from.

Fits the ``datamodel`` method on the first m models of its own pool, for
several m, and scores each fit like a run: LDS against the task's LDS pool and
MRR against the planted ground truth. Trains nothing: both pools must already
hold the models (run ``harness run --method datamodel`` first).

    python benchmarks/datamodel_scaling.py --task facts --models 32
"""

from __future__ import annotations

import argparse

import numpy as np
from stored import add_task_arguments, size_list, stored_bundle, stored_pool

from harness.metrics import lds_per_query, query_metrics
from harness.retrain import ensure_disjoint
from methods.datamodel import fit_datamodels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_task_arguments(parser)
    parser.add_argument("--models", type=int, default=32, help="size of the datamodel pool")
    parser.add_argument("--pool-models", type=int, default=30, help="size of the LDS pool")
    parser.add_argument("--fraction", type=float, default=0.5, help="the datamodel pool's α")
    parser.add_argument("--pool-fraction", type=float, default=0.5, help="the LDS pool's α")
    parser.add_argument("--sizes", type=size_list(2, "a regression needs 2"), default="4,8,16,32")
    parser.add_argument("--estimator", default="ridge", choices=("ridge", "lasso"))
    parser.add_argument("--regularization", type=float, default=0.1)
    args = parser.parse_args()

    if max(args.sizes) > args.models:
        parser.error(f"--sizes {max(args.sizes)} exceeds --models {args.models}")
    bundle = stored_bundle(parser, args)
    scale = bundle.scale
    learn = stored_pool(parser, bundle, "datamodel", models=args.models, fraction=args.fraction)
    evaluate = stored_pool(
        parser, bundle, "lds", models=args.pool_models, fraction=args.pool_fraction
    )
    ensure_disjoint(learn, evaluate)
    queries = bundle.learned_queries
    ids = [q.id for q in queries]
    index = {doc_id: i for i, doc_id in enumerate(bundle.data.document_ids)}
    relevant = [[index[d] for d in q.relevant] for q in queries]
    print(
        f"datamodels ({args.estimator}, λ = {args.regularization}) fitted on m of "
        f"{len(learn)} retrains, {args.task}/{scale}, LDS against the {len(evaluate)}-model pool"
    )
    print("| m | LDS | MRR |")
    print("|---|---|---|")
    for m in args.sizes:
        scores = fit_datamodels(
            learn.masks[:m].astype(np.float64),
            learn.targets(ids)[:m],
            estimator=args.estimator,
            strength=args.regularization,
        )
        lds = lds_per_query(scores, evaluate.masks, evaluate.targets(ids)).mean()
        mrr = query_metrics(scores, relevant, seed=args.seed)["reciprocal_rank"].mean()
        print(f"| {m} | {lds:.3f} | {mrr:.3f} |")


if __name__ == "__main__":
    main()

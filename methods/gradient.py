"""Gradient-similarity methods: gradient dot product, gradient cosine and TracIn.

All score ``∇ℓ(query)ᵀ ∇ℓ(document)`` in some form. A positive product means a
gradient step on the document lowers the query's loss, so larger is already a
proponent and no sign flip is needed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from harness.bundle import Bundle
from harness.data import Query
from harness.gradients import gradient_products
from harness.method import Method
from harness.params import Params, param


@dataclasses.dataclass(frozen=True)
class GradientParams(Params):
    chunk_size: int = param(
        32,
        help="sequences per vectorised gradient chunk (memory only)",
        low=1,
        high=4096,
        tune=False,
    )


@dataclasses.dataclass(frozen=True)
class TracInParams(GradientParams):
    normalize: bool = param(False, help="use gradient cosines instead of inner products")
    last_checkpoints: int = param(
        0, help="use only the last N checkpoints (0 = all)", low=0, high=100
    )


class GradDot(Method, name="grad_dot", family="gradient"):
    """Inner product of query and document loss gradients at the final checkpoint."""

    description = "gradient inner product, final checkpoint"
    Params = GradientParams
    normalize = False

    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        products = gradient_products(
            bundle.model(),
            bundle.encode_queries(queries),
            bundle.documents,
            normalize=self.normalize,
            chunk_size=self.params.chunk_size,
        )
        return products.double().numpy()


class GradCos(GradDot, name="grad_cos", family="gradient"):
    """Cosine of query and document loss gradients at the final checkpoint."""

    description = "gradient cosine, final checkpoint"
    normalize = True


class TracIn(Method, name="tracin", family="gradient"):
    """TracInCP (Pruthi et al., 2020): Σ_c η_c ∇ℓ_c(query)ᵀ ∇ℓ_c(document) over checkpoints c.

    η_c is the learning rate in force when checkpoint c was saved.
    """

    description = "TracIn over the saved checkpoints, weighted by learning rate"
    Params = TracInParams

    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        available, last = len(bundle.checkpoints), self.params.last_checkpoints
        if last > available:
            raise ValueError(
                f"last_checkpoints={last}, but the model kept only {available} checkpoints"
            )
        query_sequences = bundle.encode_queries(queries)
        first = -last if last else 0
        total = np.zeros((len(queries), len(bundle.data.documents)))
        for index in range(len(bundle.checkpoints))[first:]:
            products = gradient_products(
                bundle.model(index),
                query_sequences,
                bundle.documents,
                normalize=self.params.normalize,
                chunk_size=self.params.chunk_size,
            )
            total += bundle.checkpoints[index].learning_rate * products.double().numpy()
        return total

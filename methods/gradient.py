"""Gradient-similarity methods: gradient dot product, gradient cosine and TracIn.

All score ``∇ℓ(query)ᵀ ∇ℓ(document)`` in some form, optionally on randomly
projected gradients. A positive product means a gradient step on the document
lowers the query's loss, so larger is already a proponent and no sign flip is
needed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from harness.bundle import Bundle
from harness.data import Query
from harness.errors import ParameterError
from harness.features import PROJECTIONS, FeatureSpec, feature_products, train_features
from harness.gradients import select_linear_modules, select_parameters
from harness.method import Method
from harness.params import Params, param

KRONECKER_MAX_RANK = 256  # 65,536 features per layer


@dataclasses.dataclass(frozen=True)
class FeatureParams(Params):
    """Which gradients, compressed how: shared by every method built on gradient features."""

    layers: str = param(
        "*",
        help="comma-separated globs over parameter names, e.g. 'blocks.*' ('*' = all); "
        "with projection=kronecker they select linear layers only",
        tune=False,
    )
    projection: str = param(
        "none",
        help="random projection of gradients: none, dense gaussian or rademacher, or "
        "LoGra's per-layer kronecker",
        choices=PROJECTIONS,
    )
    projection_dim: int = param(
        512,
        search=(16, 2048),
        help="dimension of a dense projection; rank per side for kronecker",
        low=1,
        high=65536,
        log=True,
    )
    chunk_size: int = param(
        96,
        help="sequences per vectorised gradient chunk (memory only)",
        low=1,
        high=4096,
        memory_only=True,
    )

    def check_model(self, model: torch.nn.Module, *, checkpoints: int) -> None:
        """Layers must select something, projections fit it, checkpoints exist."""
        if self.projection == "kronecker":
            select_linear_modules(model, self.layers)
            if self.projection_dim > KRONECKER_MAX_RANK:
                raise ParameterError(
                    f"projection_dim={self.projection_dim} is a Kronecker rank per side "
                    f"({self.projection_dim}² features per layer); the largest is "
                    f"{KRONECKER_MAX_RANK}"
                )
        else:
            size = sum(p.numel() for _, p in select_parameters(model, self.layers))
            if self.projection != "none" and self.projection_dim > size:
                raise ParameterError(
                    f"projection_dim={self.projection_dim} exceeds the {size} gradient "
                    f"entries of layers={self.layers!r}: a projection must compress"
                )
        last = getattr(self, "last_checkpoints", 0)
        if last > checkpoints:
            raise ParameterError(
                f"last_checkpoints={last}, but this task's recipe keeps {checkpoints} checkpoints"
            )

    def spec(self, seed: int) -> FeatureSpec:
        return FeatureSpec(
            layers=self.layers, projection=self.projection, dim=self.projection_dim, seed=seed
        )


@dataclasses.dataclass(frozen=True)
class TracInParams(FeatureParams):
    normalize: bool = param(False, help="use gradient cosines instead of inner products")
    last_checkpoints: int = param(
        0, help="use only the last N checkpoints (0 = all)", low=0, high=100, search=(0, 4)
    )


def selected_checkpoints(bundle: Bundle, last: int) -> range:
    """Indices of the last ``last`` checkpoints (all when 0)."""
    available = len(bundle.checkpoints)
    if last > available:
        raise ValueError(f"asked for the last {last} checkpoints, but the model kept {available}")
    return range(available)[-last if last else 0 :]


class GradDot(Method, name="grad_dot", family="gradient"):
    """Inner product of query and document loss gradients at the final checkpoint."""

    description = "gradient inner product, final checkpoint"
    Params = FeatureParams
    normalize = False

    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        featurizer, features = train_features(
            bundle, self.params.spec(self.seed), chunk_size=self.params.chunk_size
        )
        query_blocks = featurizer.matrix(bundle.encode_queries(queries))
        products = feature_products(query_blocks, features, normalize=self.normalize)
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
        indices = selected_checkpoints(bundle, self.params.last_checkpoints)
        query_sequences = bundle.encode_queries(queries)
        total = torch.zeros(len(queries), len(bundle.data.documents), dtype=torch.float64)
        for index in indices:
            featurizer, features = train_features(
                bundle,
                self.params.spec(self.seed),
                checkpoint=index,
                chunk_size=self.params.chunk_size,
            )
            query_blocks = featurizer.matrix(query_sequences)
            products = feature_products(query_blocks, features, normalize=self.params.normalize)
            total += bundle.checkpoints[index].learning_rate * products.double()
        return total.numpy()

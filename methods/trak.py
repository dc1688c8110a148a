"""TRAK (Park et al., 2023): a kernel regression on randomly projected gradients.

For each model m (the reference and independently trained replicas) and each
of its chosen checkpoints c, with Φ the (documents × k) projected loss
gradients and φ_q a query's::

    τ_mc(q, ·) = φ_qᵀ (Φᵀ Φ + λ I)⁻¹ Φᵀ

averaged over (m, c), then (optionally) each document's column weighted by its
mean out-to-loss factor ``1 − p̄``, where p̄ is the document's per-token
likelihood under the model: TRAK's ``Q`` for a sequence loss. λ is relative:
``damping`` times the mean eigenvalue of ΦᵀΦ. A positive score means the
document's gradient points along the query's in the kernel's metric: a proponent.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from harness.bundle import Bundle
from harness.curvature import damped_inverse, mean_eigenvalue
from harness.data import Query
from harness.features import TrainFeatures, feature_products, train_features
from harness.method import Method
from harness.params import param
from harness.projection import DENSE_KINDS
from methods.gradient import FeatureParams, selected_checkpoints


@dataclasses.dataclass(frozen=True)
class TRAKParams(FeatureParams):
    projection: str = param(
        "rademacher", help="random projection of the gradients", choices=DENSE_KINDS
    )
    projection_dim: int = param(
        512, help="projected dimension k", low=8, high=65536, log=True, search=(64, 4096)
    )
    damping: float = param(
        0.1,
        help="ridge λ relative to the mean eigenvalue of ΦᵀΦ (must be positive)",
        low=1e-9,
        high=1e3,
        log=True,
        search=(1e-5, 10.0),
    )
    last_checkpoints: int = param(
        0,
        help="ensemble over the last N checkpoints of each model (0 = all)",
        low=0,
        high=100,
        search=(0, 4),
    )
    models: int = param(
        1,
        help="independently trained models to ensemble over (extra ones are trained and "
        "cached on first use)",
        low=1,
        high=16,
        search=(1, 4),
    )
    out_to_loss: bool = param(True, help="weight documents by 1 − their mean token likelihood")


def kernel_scores(
    query_features: torch.Tensor, features: TrainFeatures, damping: float
) -> torch.Tensor:
    """One member's ``φ_qᵀ (ΦᵀΦ + λI)⁻¹ Φᵀ``, λ = damping × mean eigenvalue of ΦᵀΦ."""
    (gram,) = features.gram()
    kernel = damped_inverse(gram, damping * mean_eigenvalue(gram), what="TRAK ΦᵀΦ")
    preconditioned = query_features.double() @ kernel
    return feature_products([preconditioned], features)


class TRAK(Method, name="trak", family="gradient"):
    """TRAK on projected loss gradients, ensembled over checkpoints and models."""

    description = "TRAK: projected-gradient kernel regression, ensembled"
    Params = TRAKParams

    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        params = self.params
        query_sequences = bundle.encode_queries(queries)
        token_counts = bundle.documents.loss_mask.sum(dim=1).double()
        scores = torch.zeros(len(queries), len(bundle.data.documents), dtype=torch.float64)
        weights = torch.zeros(len(bundle.data.documents), dtype=torch.float64)
        members = 0
        for model_index in range(params.models):
            member = bundle.replica(model_index)
            for checkpoint in selected_checkpoints(member, params.last_checkpoints):
                featurizer, features = train_features(
                    member, params.spec(self.seed), checkpoint=checkpoint,
                    chunk_size=params.chunk_size,
                )  # fmt: skip
                (query_features,) = featurizer.matrix(query_sequences)
                scores += kernel_scores(query_features, features, params.damping).double()
                assert features.losses is not None
                likelihood = torch.exp(-torch.from_numpy(features.losses).double() / token_counts)
                weights += 1.0 - likelihood
                members += 1
        scores /= members
        if params.out_to_loss:
            scores *= weights / members
        return scores.numpy()

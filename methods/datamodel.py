"""Linear datamodels (Ilyas et al., 2022): learn attribution from retrained models.

For each query, a regularised linear model predicts a retrained model's target
log-probability from which documents it was trained on::

    log p_m(target | prompt) ≈ b + Σ_i w_i · [document i in model m's subset]

and ``w`` is the attribution: the expected change in the target's
log-probability when document ``i`` is added. The retrains come from the
method's own pool (purpose ``datamodel``), whose seeds never meet those of the
pool that LDS evaluates against (:func:`harness.retrain.ensure_disjoint`).

The model never looks at the reference model's weights, so the
model-randomisation check flags it as model-independent, which is the truth.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.linear_model import Lasso, Ridge

from harness.bundle import Bundle
from harness.data import Query
from harness.method import Method
from harness.params import Params, param
from harness.retrain import SubsetPool, build_pool


@dataclasses.dataclass(frozen=True)
class DatamodelParams(Params):
    models: int = param(
        32,
        help="retrained models to learn from, in the method's own pool (trained on first "
        "use and cached; a larger pool reuses a smaller one's models)",
        low=2,
        high=100_000,
        log=True,
        tune=False,
    )
    fraction: float = param(
        0.5, help="fraction α of the documents each retrained model keeps", low=0.05, high=0.95,
        tune=False,
    )  # fmt: skip
    estimator: str = param("ridge", help="regularised regression", choices=("ridge", "lasso"))
    regularization: float = param(
        0.1,
        help="penalty strength λ on standardised masks and targets: ridge minimises "
        "mean squared error + λ‖w‖², lasso half of it + λ‖w‖₁",
        low=1e-4,
        high=1e3,
        log=True,
    )


class Datamodel(Method, name="datamodel", family="datamodel"):
    """Per-query ridge or lasso regression from subset masks to target log-probabilities."""

    description = "linear datamodels fitted on the method's own pool of subset retrains"
    Params = DatamodelParams

    pool: SubsetPool | None = None

    def fit(self, bundle: Bundle) -> None:
        params = self.params
        self.pool = build_pool(bundle, "datamodel", models=params.models, fraction=params.fraction)

    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        if self.pool is None:
            self.fit(bundle)
        assert self.pool is not None
        masks = self.pool.masks.astype(np.float64)
        targets = self.pool.targets([q.id for q in queries])  # (M, Q)
        return fit_datamodels(
            masks, targets, estimator=self.params.estimator, strength=self.params.regularization
        )


def fit_datamodels(
    masks: np.ndarray, targets: np.ndarray, *, estimator: str, strength: float
) -> np.ndarray:
    """Coefficients (n_queries, n_documents) in log-probability per included document.

    Columns and targets are standardised so that one strength suits every task;
    coefficients are mapped back to the original units. A document that every
    model kept, or none did, carries no information and gets 0; so does every
    document for a query whose target never varies.
    """
    n_models = masks.shape[0]
    x_mean, x_std = masks.mean(axis=0), masks.std(axis=0)
    informative = x_std > 0
    x = (masks[:, informative] - x_mean[informative]) / x_std[informative]
    y_mean, y_std = targets.mean(axis=0), targets.std(axis=0)
    varying = y_std > 0
    y = (targets[:, varying] - y_mean[varying]) / y_std[varying]

    coefficients = np.zeros((targets.shape[1], masks.shape[1]))
    if not varying.any() or not informative.any():
        return coefficients
    if estimator == "ridge":
        # sklearn's ridge minimises ‖y − Xw‖² + α‖w‖²: α = λ·M gives the mean-error form
        model = Ridge(alpha=strength * n_models, fit_intercept=False)
    elif estimator == "lasso":
        model = Lasso(alpha=strength, fit_intercept=False, max_iter=10_000)
    else:
        raise ValueError(f"unknown estimator {estimator!r}; valid: ridge, lasso")
    model.fit(x, y)
    weights = np.atleast_2d(model.coef_)  # (n_varying_queries, n_informative)
    scaled = weights / x_std[informative] * y_std[varying][:, None]
    coefficients[np.ix_(varying, informative)] = scaled
    return coefficients

"""Influence functions: ``g_qᵀ (F + λI)⁻¹ g_d`` with three approximations of the curvature F.

- ``ekfac``: F block-diagonal over the chosen linear layers, each block
  eigenvalue-corrected Kronecker-factored (George et al. 2018; Grosse et al.
  2023), fitted on the training documents with labels drawn from the model
  (the true Fisher) or the real ones (the empirical Fisher).
- ``logra``: gradients projected per layer with LoGra's Kronecker projection
  (Choe et al. 2024); F per layer is the projected gradients' second moment.
- ``datainf``: DataInf's closed form (Kwon et al. 2024), which swaps the order
  of averaging and inversion so that each per-example term inverts exactly by
  Sherman–Morrison: ``F_l⁻¹ ≈ (1/n) Σ_i (λ_l I + g_il g_ilᵀ)⁻¹`` per layer l.

Every damping is relative to the curvature's mean eigenvalue, so one value
transfers across layers and scales. Influence here is the change of the
query's loss *decrease* when a document is up-weighted: positive is a
proponent, as the contract asks.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.bundle import Bundle
from harness.curvature import KroneckerCurvature, check_damping, damped_inverse, mean_eigenvalue
from harness.data import Query
from harness.errors import ParameterError
from harness.features import FeatureSpec, TrainFeatures, feature_products, train_features
from harness.gradients import ModuleCapture, select_linear_modules
from harness.method import Method
from harness.params import param
from harness.projection import with_bias_column
from methods.gradient import FeatureParams

_logger = logging.getLogger(__name__)

_DAMPING_HELP = "λ relative to the curvature's mean eigenvalue (must be positive)"


@dataclasses.dataclass(frozen=True)
class LoGraParams(FeatureParams):
    layers: str = param(
        "*",
        help="globs over linear layers' weight names: the projection covers linear layers "
        "only ('*' = every one, the output head's use of the tied embedding included)",
        tune=False,
    )
    projection: str = param("kronecker", help="LoGra's projection (fixed)", choices=("kronecker",))
    projection_dim: int = param(
        16,
        help="projection rank on each side of a layer (rank² features)",
        low=1,
        high=256,
        log=True,
    )
    damping: float = param(
        0.1, help=_DAMPING_HELP, low=1e-9, high=1e3, log=True, search=(1e-5, 10.0)
    )


@dataclasses.dataclass(frozen=True)
class DataInfParams(FeatureParams):
    projection: str = param(
        "none",
        help="gradients the closed form works on: full (as in the paper), LoGra-projected "
        "or dense-projected",
        choices=("none", "kronecker", "gaussian", "rademacher"),
    )
    projection_dim: int = param(
        16,
        help="rank per side (kronecker) or dimension (dense)",
        low=1,
        high=65536,
        log=True,
        search=(4, 2048),
    )
    damping: float = param(
        0.1,
        help="λ_l relative to the block's mean squared gradient entry (the paper's 0.1)",
        low=1e-9,
        high=1e3,
        log=True,
        search=(1e-5, 10.0),
    )


@dataclasses.dataclass(frozen=True)
class EKFACParams(FeatureParams):
    layers: str = param(
        "hidden",
        help="globs over linear layers' weight names, or 'hidden': all but the output head "
        "(whose output factor is vocabulary-sized, and tied to the embedding in the GPT)",
        tune=False,
    )
    projection: str = param("none", help="EK-FAC works on full gradients", choices=("none",))
    damping: float = param(
        0.1, help=_DAMPING_HELP, low=1e-9, high=1e3, log=True, search=(1e-5, 10.0)
    )
    fisher: str = param(
        "sampled",
        help="labels of the curvature: drawn from the model (true Fisher) or the data's",
        choices=("sampled", "empirical"),
    )
    fit_documents: int = param(
        0, help="documents the curvature is fitted on (0 = all)", low=0, high=10_000_000,
        tune=False,
    )  # fmt: skip


def _refuse_tied(model: torch.nn.Module, modules: list[tuple[str, torch.nn.Linear]]) -> None:
    aliases: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    for name, module in modules:
        shared = aliases[id(module.weight)]
        others = [alias for alias in shared if not alias.startswith(f"{name}.")]
        if others:
            raise ParameterError(
                f"layer {name!r} shares its weight with {others}; "
                "EK-FAC's curvature covers a linear layer alone, so choose layers without it "
                "(the default 'hidden' does)"
            )


def logra_scores(
    query_blocks: list[torch.Tensor], features: TrainFeatures, damping: float
) -> torch.Tensor:
    """``Σ_l φ_qlᵀ (F_l + λ_l I)⁻¹ φ_dl`` with ``F_l = Φ_lᵀΦ_l / n`` per feature block l."""
    preconditioned = []
    for block, gram, query in zip(features.blocks, features.gram(), query_blocks, strict=True):
        curvature = gram / len(features)
        inverse = damped_inverse(curvature, damping * mean_eigenvalue(curvature), what=block.name)
        preconditioned.append(query.double() @ inverse)
    return feature_products(preconditioned, features)


def datainf_scores(
    query_blocks: list[torch.Tensor], features: TrainFeatures, damping: float
) -> torch.Tensor:
    """DataInf per feature block l, with ``λ_l = damping · mean_i ‖g_il‖² / size_l``.

    ``(1/n) Σ_i (λI + g_i g_iᵀ)⁻¹ = (1/λ) (I − (1/n) Σ_i g_i g_iᵀ / (λ + ‖g_i‖²))``, so a
    query's preconditioned gradient needs one pass over the documents, after one
    pass for the norms; a third pass scores.
    """
    check_damping(damping)
    n = len(features)
    squared_norms = torch.zeros(n, len(features.blocks), dtype=torch.float64)
    for rows, blocks in features.chunks():
        for index, block in enumerate(blocks):
            squared_norms[rows, index] = torch.linalg.vector_norm(block, dim=1).double() ** 2
    sizes = torch.tensor([b.size for b in features.blocks], dtype=torch.float64)
    dampings = damping * squared_norms.mean(dim=0) / sizes
    dampings = dampings.clamp_min(torch.finfo(torch.float64).tiny)  # a block with no signal

    # products in float32 (full gradients can be large), sums kept in float64
    sums = [torch.zeros(q.shape, dtype=torch.float64) for q in query_blocks]
    for rows, blocks in features.chunks():
        for index, block in enumerate(blocks):
            coefficients = (query_blocks[index] @ block.T).double() / (
                dampings[index] + squared_norms[rows, index]
            )
            sums[index] += (coefficients.float() @ block).double()
    preconditioned = [
        (q.double() - s / n) / damping_l
        for q, s, damping_l in zip(query_blocks, sums, dampings.tolist(), strict=True)
    ]
    return feature_products(preconditioned, features)


class LoGra(Method, name="logra", family="gradient"):
    """Influence on LoGra-projected gradients, per-layer curvature in the projected space."""

    description = "LoGra: Kronecker-projected influence"
    Params = LoGraParams

    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        featurizer, features = train_features(
            bundle, self.params.spec(self.seed), chunk_size=self.params.chunk_size
        )
        query_blocks = featurizer.matrix(bundle.encode_queries(queries))
        return logra_scores(query_blocks, features, self.params.damping).double().numpy()


class DataInf(Method, name="datainf", family="gradient"):
    """DataInf's closed-form inverse, per block of the (projected) gradients."""

    description = "DataInf: closed-form influence, per gradient block"
    Params = DataInfParams

    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        featurizer, features = train_features(
            bundle, self.params.spec(self.seed), chunk_size=self.params.chunk_size
        )
        query_blocks = featurizer.matrix(bundle.encode_queries(queries))
        return datainf_scores(query_blocks, features, self.params.damping).double().numpy()


class EKFAC(Method, name="ekfac", family="gradient"):
    """Influence with eigenvalue-corrected Kronecker-factored curvature of linear layers."""

    description = "EK-FAC influence functions over the linear layers"
    Params = EKFACParams

    def check_model(self, model: torch.nn.Module, *, checkpoints: int) -> None:
        _refuse_tied(model, select_linear_modules(model, self.params.layers))

    def fit(self, bundle: Bundle) -> None:
        params = self.params
        check_damping(params.damping)
        model = bundle.model()
        modules = select_linear_modules(model, params.layers)
        _refuse_tied(model, modules)
        capture = ModuleCapture(model, [module for _, module in modules])
        self.curvatures = [KroneckerCurvature(name, module) for name, module in modules]
        documents = bundle.documents
        if params.fit_documents and params.fit_documents < len(documents):
            generator = torch.Generator().manual_seed(self.seed)
            chosen = torch.randperm(len(documents), generator=generator)[: params.fit_documents]
            documents = documents[chosen.sort().values]
        generator = torch.Generator().manual_seed(self.seed)
        sample = params.fisher == "sampled"

        def passes(description: str):
            """(loss mask, captured inputs and output gradients) per chunk of one pass."""
            starts = range(0, len(documents), params.chunk_size)
            for start in tqdm(starts, desc=description, leave=False, disable=None):
                batch = documents[start : start + params.chunk_size]
                captured, _ = capture(batch, sample_labels=sample, generator=generator)
                yield batch.loss_mask, zip(self.curvatures, captured, strict=True)

        for loss_mask, layers in passes("EK-FAC factors"):
            for curvature, (inputs, output_grads) in layers:
                curvature.add_factors(inputs, output_grads, loss_mask)
        for curvature in self.curvatures:
            curvature.eigendecompose()
        # fresh label samples: the correction is a second, independent estimate
        for _, layers in passes("EK-FAC eigenvalues"):
            for curvature, (inputs, output_grads) in layers:
                curvature.add_correction(inputs, output_grads)
        self.model_key = bundle.model_key

    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        if getattr(self, "model_key", None) != bundle.model_key:
            self.fit(bundle)
        model = bundle.model()
        modules = [(c.name, c.module) for c in self.curvatures]
        # fit() captured its own copy of the model; the layers are found again by name
        by_name = dict(model.named_modules())
        live = [by_name[name] for name, _ in modules]
        captured, _ = ModuleCapture(model, live)(bundle.encode_queries(queries))

        # preconditioned query gradients, split into the weight and bias blocks that
        # the gradient engine produces for the documents
        names, preconditioned = [], []
        for curvature, module, (inputs, output_grads) in zip(
            self.curvatures, live, captured, strict=True
        ):
            batch = inputs.shape[0]
            a = with_bias_column(inputs.reshape(batch, -1, inputs.shape[-1]), module)
            e = output_grads.reshape(batch, -1, output_grads.shape[-1])
            gradients = torch.bmm(e.transpose(1, 2), a)
            damping = self.params.damping * float(curvature.eigenvalues("ekfac").mean())
            result = curvature.precondition(gradients, damping=damping)
            names.append(f"{curvature.name}.weight")
            preconditioned.append(result[:, :, : module.in_features].flatten(1))
            if module.bias is not None:
                names.append(f"{curvature.name}.bias")
                preconditioned.append(result[:, :, -1])
        spec = FeatureSpec(layers=",".join(names), projection="none")
        _, features = train_features(bundle, spec, chunk_size=self.params.chunk_size)
        order = {name: i for i, name in enumerate(names)}
        blocks = [preconditioned[order[block.name]] for block in features.blocks]
        return feature_products(blocks, features).double().numpy()

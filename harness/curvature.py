"""Curvature approximations for influence functions, and their damped inverses.

Influence of a training document ``d`` on a query ``q`` is ``g_qᵀ (F + λI)⁻¹ g_d``,
with ``g`` per-example loss gradients and ``F`` a curvature matrix (here a
Fisher or Gauss-Newton approximation of the Hessian, which is positive
semi-definite where the Hessian of a non-convex network need not be).

- :func:`damped_inverse`: a dense symmetric matrix, inverted through its
  eigendecomposition, negative eigenvalues (rounding) clamped to zero and counted.
- :class:`KroneckerCurvature`: one linear layer's K-FAC factors ``A = E[a aᵀ]``
  (inputs) and ``S = E[e eᵀ]`` (output gradients), so that ``F ≈ S ⊗ A``, with
  the eigenvalue correction of EK-FAC (George et al. 2018): in the Kronecker
  eigenbasis, replace the products of factor eigenvalues by the exact second
  moments of the rotated per-example gradients.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from harness.errors import ParameterError
from harness.projection import with_bias_column

_logger = logging.getLogger(__name__)


def symmetric_eigh(matrix: torch.Tensor, *, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and vectors of a PSD matrix; negative eigenvalues clamped, with a count."""
    eigenvalues, vectors = torch.linalg.eigh(matrix.double())
    negative = int((eigenvalues < 0).sum())
    if negative:
        # rounding leaves tiny negative eigenvalues in any rank-deficient matrix; only
        # ones large against the spectrum point at a real problem
        significant = -eigenvalues.min() > 1e-6 * eigenvalues.abs().max()
        _logger.log(
            logging.WARNING if significant else logging.DEBUG,
            "%s: clamped %d negative eigenvalues (most negative %.3g) to zero",
            what,
            negative,
            float(eigenvalues.min()),
        )
    return eigenvalues.clamp(min=0.0), vectors


def check_damping(damping: float) -> None:
    if not damping > 0:
        raise ParameterError(f"damping must be positive, but got {damping!r}")


def damped_inverse(
    matrix: torch.Tensor, damping: float, *, what: str = "curvature"
) -> torch.Tensor:
    """``(M + damping·I)⁻¹`` of a symmetric PSD matrix, in float64."""
    check_damping(damping)
    eigenvalues, vectors = symmetric_eigh(matrix, what=what)
    return (vectors / (eigenvalues + damping)) @ vectors.T


def mean_eigenvalue(matrix: torch.Tensor) -> float:
    return float(torch.diagonal(matrix).mean()) if matrix.numel() else 0.0


class KroneckerCurvature:
    """K-FAC / EK-FAC curvature of one linear layer, accumulated chunk by chunk.

    Per-example gradients of the layer are ``G = Σ_t e_t a_tᵀ`` (out × in, with a
    constant 1 appended to ``a`` when the layer has a bias). Use in three steps:
    :meth:`add_factors` over the fitting data, :meth:`eigendecompose`, then
    :meth:`add_correction` over the fitting data again (EK-FAC only).
    """

    def __init__(self, name: str, module: nn.Linear) -> None:
        self.name, self.module = name, module
        inputs = module.in_features + (module.bias is not None)
        self.input_moment = torch.zeros(inputs, inputs, dtype=torch.float64)
        self.output_moment = torch.zeros(
            module.out_features, module.out_features, dtype=torch.float64
        )
        self.tokens = 0
        self.examples = 0
        self.correction: torch.Tensor | None = None
        self.corrected_examples = 0

    def add_factors(
        self, inputs: torch.Tensor, output_grads: torch.Tensor, loss_mask: torch.Tensor
    ) -> None:
        mask = loss_mask.reshape(-1) > 0
        a = with_bias_column(inputs, self.module).reshape(-1, self.input_moment.shape[0])[mask]
        e = output_grads.reshape(-1, self.output_moment.shape[0])
        # float32 products per chunk (float64 matmul is several times slower), summed in float64
        self.input_moment += (a.T @ a).double()
        self.output_moment += (e.T @ e).double()
        self.tokens += int(mask.sum())
        self.examples += loss_mask.shape[0]

    def eigendecompose(self) -> None:
        """``A = Σ a aᵀ / tokens`` and ``S = Σ e eᵀ / examples``, so that ``F ≈ S ⊗ A``.

        (For one token per example these are the plain second moments; with many,
        ``F = E_n[Σ_t Σ_s ...]`` has ``tokens/examples`` terms per example.)
        """
        if not self.examples:
            raise ValueError(f"layer {self.name}: no fitting data was added")
        self.input_values, self.input_vectors = symmetric_eigh(
            self.input_moment / max(self.tokens, 1), what=f"{self.name} input factor"
        )
        self.output_values, self.output_vectors = symmetric_eigh(
            self.output_moment / self.examples, what=f"{self.name} output-gradient factor"
        )
        self.correction = torch.zeros(
            len(self.output_values), len(self.input_values), dtype=torch.float64
        )
        self._vectors32 = (self.input_vectors.float(), self.output_vectors.float())

    def rotate(self, inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
        """Per-example gradients in the Kronecker eigenbasis, ``Q_Sᵀ G Q_A``: (batch, out, in)."""
        batch = inputs.shape[0]
        a = with_bias_column(inputs.reshape(batch, -1, inputs.shape[-1]), self.module)
        e = output_grads.reshape(batch, -1, output_grads.shape[-1])
        # rotating tokens before the outer product is cheaper than rotating G
        a = a @ self._vectors32[0]
        e = e @ self._vectors32[1]
        return torch.bmm(e.transpose(1, 2), a)

    def add_correction(self, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        assert self.correction is not None, "eigendecompose first"
        rotated = self.rotate(inputs, output_grads)
        self.correction += rotated.square().sum(dim=0).double()
        self.corrected_examples += rotated.shape[0]

    def eigenvalues(self, kind: str) -> torch.Tensor:
        """(out, in) curvature eigenvalues in the Kronecker eigenbasis."""
        if kind == "kfac":
            return torch.outer(self.output_values, self.input_values)
        if kind == "ekfac":
            if not self.corrected_examples:
                raise ValueError(f"layer {self.name}: no eigenvalue correction was added")
            assert self.correction is not None
            return self.correction / self.corrected_examples
        raise ValueError(f"kind must be 'kfac' or 'ekfac', but got {kind!r}")

    def precondition(
        self, gradients: torch.Tensor, *, damping: float, kind: str = "ekfac"
    ) -> torch.Tensor:
        """``(F + damping·I)⁻¹ G`` for per-example gradients G of shape (n, out, in)."""
        check_damping(damping)
        q_out, q_in = self.output_vectors, self.input_vectors
        rotated = q_out.T @ gradients.double() @ q_in
        rotated = rotated / (self.eigenvalues(kind) + damping)
        return q_out @ rotated @ q_in.T

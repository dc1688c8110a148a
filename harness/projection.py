"""Random projections of per-example gradients to a few hundred dimensions.

Two kinds, both seeded and reproducible on any machine:

- :class:`DenseProjection`: ``g ↦ Πᵀ g`` for a (size × dim) Gaussian or
  Rademacher matrix scaled by ``1/√dim`` (so squared norms and inner products
  are preserved in expectation, Johnson–Lindenstrauss). The matrix is built in
  row pieces, each from its own seed, so it is never needed whole: pieces are
  kept in memory while they fit a budget and regenerated per use beyond it.
- :class:`KroneckerProjection` (LoGra, Choe et al. 2024): for a linear layer
  whose per-example gradient is ``G = Σ_t e_t a_tᵀ``, project the layer's input
  activations and output gradients separately, ``Σ_t (P_outᵀ e_t)(P_inᵀ a_t)ᵀ``,
  which equals ``(P_out ⊗ P_in)ᵀ vec(G)`` without ever forming ``G``.
"""

from __future__ import annotations

import hashlib
import logging
import math

import torch
from torch import nn

from harness.errors import ParameterError
from harness.gradients import Block

_logger = logging.getLogger(__name__)

DENSE_KINDS = ("gaussian", "rademacher")
_LAST_KEPT: dict = {}  # the most recently kept projection matrix, shared by equal configurations
PIECE_BYTES = 64 * 2**20  # one generated piece of a projection matrix


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_matrix(rows: int, columns: int, *, kind: str, seed: int) -> torch.Tensor:
    """A (rows, columns) matrix with unit-variance entries, scaled by 1/√columns."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        matrix = torch.randn(rows, columns, generator=generator)
    elif kind == "rademacher":
        matrix = torch.randint(0, 2, (rows, columns), generator=generator, dtype=torch.int8)
        matrix = matrix.float().mul_(2).sub_(1)
    else:
        raise ParameterError(f"projection kind must be one of {DENSE_KINDS}, but got {kind!r}")
    return matrix.mul_(1.0 / math.sqrt(columns))


class DenseProjection:
    """Project gradient blocks (as given by :class:`GradientEngine`) to ``dim`` columns."""

    def __init__(
        self,
        blocks: list[Block],
        dim: int,
        *,
        kind: str,
        seed: int,
        memory_budget_bytes: int = 2 * 2**30,
    ) -> None:
        if dim < 1:
            raise ParameterError(f"projection dimension must be at least 1, but got {dim}")
        if kind not in DENSE_KINDS:
            raise ParameterError(f"projection kind must be one of {DENSE_KINDS}, but got {kind!r}")
        self.blocks, self.dim, self.kind, self.seed = blocks, dim, kind, seed
        rows_per_piece = max(1, PIECE_BYTES // (4 * dim))
        # (block index, first row, last row) of every piece, in a fixed order
        self.pieces = [
            (index, start, min(start + rows_per_piece, block.size))
            for index, block in enumerate(blocks)
            for start in range(0, block.size, rows_per_piece)
        ]
        total_bytes = 4 * dim * sum(block.size for block in blocks)
        self.keep = total_bytes <= memory_budget_bytes
        self._kept: dict[int, torch.Tensor] = {}
        if self.keep:
            # the same matrix serves every checkpoint and model of one configuration:
            # generating it costs more than projecting a few hundred documents with it
            key = (kind, dim, seed, tuple(blocks))
            if _LAST_KEPT.get("key") != key:
                _LAST_KEPT.clear()
                _LAST_KEPT.update(key=key, pieces={})
            self._kept = _LAST_KEPT["pieces"]
        if not self.keep:
            _logger.info(
                "the %.1f GiB projection matrix exceeds the %.1f GiB budget: its pieces are "
                "regenerated for every chunk",
                total_bytes / 2**30,
                memory_budget_bytes / 2**30,
            )

    @classmethod
    def from_matrix(cls, blocks: list[Block], matrix: torch.Tensor) -> DenseProjection:
        """A projection by a given (size, dim) matrix, e.g. an orthogonal one in tests."""
        size = sum(block.size for block in blocks)
        if matrix.shape[0] != size:
            raise ValueError(f"matrix has {matrix.shape[0]} rows, but the gradients have {size}")
        projection = cls(blocks, matrix.shape[1], kind="gaussian", seed=0, memory_budget_bytes=0)
        projection.keep = True
        projection._kept = {}  # its own pieces, never the shared seeded ones
        offsets = [0]
        for block in blocks:
            offsets.append(offsets[-1] + block.size)
        for number, (index, start, stop) in enumerate(projection.pieces):
            projection._kept[number] = matrix[offsets[index] + start : offsets[index] + stop]
        return projection

    def piece(self, number: int) -> torch.Tensor:
        if number in self._kept:
            return self._kept[number]
        index, start, stop = self.pieces[number]
        matrix = random_matrix(
            stop - start,
            self.dim,
            kind=self.kind,
            seed=_seed(self.seed, self.kind, self.dim, self.blocks[index].name, start),
        )
        if self.keep:
            self._kept[number] = matrix
        return matrix

    def __call__(self, gradient_blocks: list[torch.Tensor]) -> torch.Tensor:
        batch = gradient_blocks[0].shape[0]
        projected = torch.zeros(batch, self.dim)
        for number, (index, start, stop) in enumerate(self.pieces):
            projected.addmm_(gradient_blocks[index][:, start:stop], self.piece(number))
        return projected

    def matrix(self) -> torch.Tensor:
        """The whole (size, dim) matrix: for tests and small models only."""
        return torch.cat([self.piece(n) for n in range(len(self.pieces))])


class KroneckerProjection:
    """LoGra's per-layer projection of linear layers to ``rank × rank`` features each.

    A layer with a bias is treated as one affine map: its input gains a constant 1,
    so the bias gradient is projected with the weight's.
    """

    def __init__(
        self,
        modules: list[tuple[str, nn.Linear]],
        rank: int,
        *,
        kind: str,
        seed: int,
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        if rank < 1:
            raise ParameterError(f"projection rank must be at least 1, but got {rank}")
        self.names = [name for name, _ in modules]
        self.rank = rank
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, module in modules:
            if factors is not None:  # given explicitly: tests use orthogonal ones
                self.factors[name] = factors[name]
                continue
            inputs = module.in_features + (module.bias is not None)
            self.factors[name] = (
                random_matrix(inputs, rank, kind=kind, seed=_seed(seed, kind, name, "in")),
                random_matrix(
                    module.out_features, rank, kind=kind, seed=_seed(seed, kind, name, "out")
                ),
            )
        self.blocks = [
            Block(name, self.factors[name][0].shape[1] * self.factors[name][1].shape[1])
            for name in self.names
        ]

    def project(
        self, name: str, module: nn.Linear, inputs: torch.Tensor, output_grads: torch.Tensor
    ) -> torch.Tensor:
        """(batch, rank_out · rank_in) features of one layer from its captured tensors."""
        batch = inputs.shape[0]
        a = with_bias_column(inputs.reshape(batch, -1, inputs.shape[-1]), module)
        e = output_grads.reshape(batch, -1, output_grads.shape[-1])
        projector_in, projector_out = self.factors[name]
        return torch.bmm((e @ projector_out).transpose(1, 2), a @ projector_in).flatten(1)


def with_bias_column(inputs: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    """Append a constant 1 to each input row when the layer has a bias."""
    if module.bias is None:
        return inputs
    return torch.cat([inputs, inputs.new_ones(*inputs.shape[:-1], 1)], dim=-1)

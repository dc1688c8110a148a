"""Gradient features of sequences, and the train-side store that computes them once.

A :class:`FeatureSpec` says which parameters' gradients to take (``layers``) and
how to compress them (``projection``). :class:`Featurizer` turns sequences into
feature blocks chunk by chunk. Training-document features of a projected spec
are written once per (model, checkpoint, spec) to a memory-mapped ``.npy`` file
under ``<results>/cache/features/`` and read back by every later query set and
every method with the same spec; unprojected gradients are too large to keep
and are recomputed (streamed) on each pass instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

import harness
from harness.bundle import Bundle
from harness.cache import Cache, code_fingerprint, content_key
from harness.data import Sequences
from harness.errors import ParameterError
from harness.gradients import Block, GradientEngine, ModuleCapture, select_linear_modules
from harness.model import GPT
from harness.projection import DENSE_KINDS, DenseProjection, KroneckerProjection

_logger = logging.getLogger(__name__)

PROJECTIONS = ("none", *DENSE_KINDS, "kronecker")
_CODE = [
    Path(harness.__file__).with_name(f)
    for f in ("gradients.py", "projection.py", "features.py", "model.py")
]


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Which gradients, compressed how.

    ``dim`` is the output dimension of a dense projection, and for ``kronecker``
    the rank on each side of every linear layer (``dim²`` features per layer).
    """

    layers: str = "*"
    projection: str = "none"
    dim: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ParameterError(
                f"projection must be one of {PROJECTIONS}, but got {self.projection!r}"
            )
        if self.dim < 1:
            raise ParameterError(f"projection dimension must be at least 1, but got {self.dim}")

    @property
    def projected(self) -> bool:
        return self.projection != "none"


class Featurizer:
    """Per-example gradient features of one model under one spec, in blocks."""

    def __init__(
        self,
        model: GPT,
        spec: FeatureSpec,
        *,
        chunk_size: int = 64,
        projection: DenseProjection | KroneckerProjection | None = None,
    ) -> None:
        """``projection`` replaces the spec's random one (tests pass orthogonal ones)."""
        self.model, self.spec, self.chunk_size = model, spec, chunk_size
        if spec.projection == "kronecker":
            self._modules = select_linear_modules(model, spec.layers)
            self._capture = ModuleCapture(model, [m for _, m in self._modules])
            self._kronecker = projection or KroneckerProjection(
                self._modules, spec.dim, kind="gaussian", seed=spec.seed
            )
            assert isinstance(self._kronecker, KroneckerProjection)
            self.blocks = self._kronecker.blocks
            return
        self._engine = GradientEngine(model, layers=spec.layers, chunk_size=chunk_size)
        self._dense = None
        if spec.projection in DENSE_KINDS:
            self._dense = projection or DenseProjection(
                self._engine.blocks, spec.dim, kind=spec.projection, seed=spec.seed
            )
            assert isinstance(self._dense, DenseProjection)
            self.blocks = [Block(f"{spec.projection}-{self._dense.dim}", self._dense.dim)]
        else:
            self.blocks = self._engine.blocks

    @property
    def size(self) -> int:
        return sum(block.size for block in self.blocks)

    def chunks(self, sequences: Sequences) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """``(feature blocks, losses)`` per chunk; blocks may be overwritten by the next one."""
        for start in range(0, len(sequences), self.chunk_size):
            yield self.features(sequences[start : start + self.chunk_size])

    def chunks_by_length(
        self, sequences: Sequences
    ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]]:
        """``(rows, feature blocks, losses)`` over chunks of similar-length sequences.

        A chunk is padded to its longest sequence, so grouping by length saves the
        arithmetic on padding (a third of it for documents of 10 to 80 tokens).
        """
        lengths = sequences.loss_mask.flip(1).cumsum(1).gt(0).sum(1)  # up to the last loss token
        order = torch.argsort(lengths, stable=True)
        for start in range(0, len(sequences), self.chunk_size):
            rows = order[start : start + self.chunk_size]
            blocks, losses = self.features(sequences[rows])
            yield rows, blocks, losses

    def features(self, chunk: Sequences) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.spec.projection == "kronecker":
            captured, losses = self._capture(chunk)
            blocks = [
                self._kronecker.project(name, module, inputs, output_grads)
                for (name, module), (inputs, output_grads) in zip(
                    self._modules, captured, strict=True
                )
            ]
            return blocks, losses
        gradient_blocks, losses = self._engine.gradients(chunk)
        if self._dense is not None:
            return [self._dense(gradient_blocks)], losses
        return gradient_blocks, losses

    def matrix(self, sequences: Sequences) -> list[torch.Tensor]:
        """All features of a small set (queries) as owned blocks, (n, block size) each."""
        parts = [[b.clone() for b in blocks] for blocks, _ in self.chunks(sequences)]
        return [torch.cat(column) for column in zip(*parts, strict=True)]


class TrainFeatures:
    """The training documents' features under one spec at one checkpoint.

    Projected features come from the store (computed on first use); unprojected
    ones are recomputed on every pass, since they would not fit on disk usefully.
    """

    def __init__(
        self,
        featurizer: Featurizer,
        documents: Sequences,
        *,
        store: FeatureStore | None,
        key_parts: dict,
    ) -> None:
        self.featurizer, self.documents = featurizer, documents
        self.blocks = featurizer.blocks
        self.stored: np.ndarray | None = None
        self.losses: np.ndarray | None = None
        if featurizer.spec.projected:
            if store is not None:
                self.stored, self.losses = store.load_or_build(featurizer, documents, key_parts)
            else:  # nowhere to keep them: hold them in memory for this object's life
                self.stored = np.zeros((len(documents), featurizer.size), dtype=np.float32)
                self.losses = np.zeros(len(documents), dtype=np.float32)
                _fill(featurizer, documents, self.stored, self.losses)

    def __len__(self) -> int:
        return len(self.documents)

    def chunks(
        self, chunk_size: int | None = None
    ) -> Iterator[tuple[slice | torch.Tensor, list[torch.Tensor]]]:
        """``(rows, feature blocks)`` covering every document once.

        ``rows`` indexes the documents of the chunk: a slice of stored features, or
        the indices of a group of similar-length documents when computed afresh.
        """
        if self.stored is None:
            for rows, blocks, _ in self.featurizer.chunks_by_length(self.documents):
                yield rows, blocks
            return
        step = chunk_size or 1024
        bounds = np.cumsum([0] + [b.size for b in self.blocks])
        for start in range(0, len(self), step):
            rows = slice(start, min(start + step, len(self)))
            block = torch.from_numpy(np.array(self.stored[rows], dtype=np.float32))
            yield rows, [block[:, bounds[i] : bounds[i + 1]] for i in range(len(self.blocks))]

    def gram(self) -> list[torch.Tensor]:
        """Per block, ``Φᵀ Φ`` summed over documents in float64: (size, size) each."""
        grams = [torch.zeros(b.size, b.size, dtype=torch.float64) for b in self.blocks]
        for _, blocks in self.chunks():
            for gram, block in zip(grams, blocks, strict=True):
                gram.addmm_(block.T.double(), block.double())
        return grams


class FeatureStore:
    """Projected training features on disk, keyed by model, checkpoint and spec."""

    kind = "features"

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def load_or_build(
        self, featurizer: Featurizer, documents: Sequences, key_parts: dict
    ) -> tuple[np.ndarray, np.ndarray]:
        key = content_key(
            {
                **key_parts,
                "spec": dataclasses.asdict(featurizer.spec),
                "code": code_fingerprint(_CODE),
                "torch": torch.__version__,
            }
        )
        folder = self.cache.path(self.kind, key)
        if self.cache.has(self.kind, key):
            _logger.info(
                "reusing stored train features %s (%s, %d × %d)",
                key,
                _describe(featurizer.spec),
                len(documents),
                featurizer.size,
            )
        else:
            self._build(featurizer, documents, key, key_parts)
        # plain arrays, no pickles: allow_pickle stays False
        return (
            np.load(folder / "features.npy", mmap_mode="r"),
            np.load(folder / "losses.npy"),
        )

    def _build(
        self, featurizer: Featurizer, documents: Sequences, key: str, key_parts: dict
    ) -> None:
        started = time.perf_counter()
        manifest = {
            **key_parts,
            "spec": dataclasses.asdict(featurizer.spec),
            "blocks": [dataclasses.asdict(b) for b in featurizer.blocks],
            "documents": len(documents),
        }
        with self.cache.writing(self.kind, key, manifest) as staging:
            matrix = open_memmap(
                staging / "features.npy", mode="w+", dtype=np.float32,
                shape=(len(documents), featurizer.size),
            )  # fmt: skip
            losses = np.zeros(len(documents), dtype=np.float32)
            _fill(featurizer, documents, matrix, losses)
            matrix.flush()
            del matrix
            np.save(staging / "losses.npy", losses)
        _logger.info(
            "stored train features %s (%s, %d × %d) in %.1f s",
            key,
            _describe(featurizer.spec),
            len(documents),
            featurizer.size,
            time.perf_counter() - started,
        )


def _fill(
    featurizer: Featurizer, documents: Sequences, matrix: np.ndarray, losses: np.ndarray
) -> None:
    total = -(-len(documents) // featurizer.chunk_size)
    chunks = featurizer.chunks_by_length(documents)
    for rows, blocks, chunk_losses in tqdm(
        chunks, total=total, desc="train features", leave=False, disable=None
    ):
        indices = rows.numpy()
        matrix[indices] = torch.cat(blocks, dim=1).numpy()
        losses[indices] = chunk_losses.numpy()


def train_features(
    bundle: Bundle, spec: FeatureSpec, *, checkpoint: int = -1, chunk_size: int = 64
) -> tuple[Featurizer, TrainFeatures]:
    """The featurizer of one checkpoint and its training documents' features.

    Projected features are stored under the bundle's cache, keyed by the model
    (reference or replica), the checkpoint and the spec.
    """
    featurizer = Featurizer(bundle.model(checkpoint), spec, chunk_size=chunk_size)
    store = FeatureStore(bundle.cache) if bundle.cache is not None else None
    key_parts = {"model": bundle.model_key, "checkpoint_step": bundle.checkpoints[checkpoint].step}
    return featurizer, TrainFeatures(
        featurizer, bundle.documents, store=store, key_parts=key_parts
    )


def feature_products(
    query_blocks: list[torch.Tensor],
    features: TrainFeatures,
    *,
    normalize: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Inner products (cosines if ``normalize``) of query and training features, (n_q, n).

    Query blocks must match ``features.blocks``. Training features are read chunk
    by chunk and never held all at once. By default projected features (up to
    2¹⁶ dimensions) are multiplied in float64, which costs little and keeps the
    large, cancelling components of damped-inverse queries exact; full gradients
    in float32, where float64 would double the cost of the largest product.
    """
    if dtype is None:
        dtype = torch.float64 if sum(b.size for b in features.blocks) <= 2**16 else torch.float32
    query_blocks = [q.to(dtype) for q in query_blocks]
    if normalize:
        norms = sum(torch.linalg.vector_norm(q, dim=1).double() ** 2 for q in query_blocks)
        scale = _inverse_norms(norms)
        query_blocks = [q * scale[:, None] for q in query_blocks]
    n_queries = query_blocks[0].shape[0]
    products = torch.empty(n_queries, len(features), dtype=dtype)
    chunk_count = -(-len(features) // features.featurizer.chunk_size)
    progress = tqdm(
        features.chunks(),
        total=None if features.stored is not None else chunk_count,
        desc="scoring documents",
        leave=False,
        disable=None,
    )
    for rows, blocks in progress:
        block_products = torch.zeros(n_queries, blocks[0].shape[0], dtype=dtype)
        for query_block, block in zip(query_blocks, blocks, strict=True):
            block_products.addmm_(query_block, block.T.to(dtype))
        if normalize:
            # vector_norm reads each block once, without a squared copy of the gradients
            norms = sum(torch.linalg.vector_norm(block, dim=1).double() ** 2 for block in blocks)
            block_products *= _inverse_norms(norms).to(dtype)
        products[:, rows] = block_products
    return products


def _inverse_norms(squared_norms: torch.Tensor) -> torch.Tensor:
    # a zero gradient has cosine 0 with everything, not NaN
    norms = squared_norms.sqrt()
    return torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), 0.0).float()


def _describe(spec: FeatureSpec) -> str:
    return f"layers {spec.layers}, {spec.projection} {spec.dim}, seed {spec.seed}"

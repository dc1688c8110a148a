"""Retrieval methods: shared exact spans, TF-IDF, and the model's own representations.

None of them takes a gradient or retrains anything. ``ngram`` and ``tfidf`` ignore
the model and find documents that share the query's text, which is what planted
data stated in the query's wording offers; ``repsim`` asks the trained model which
documents it represents like the query's target.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from torch import nn
from torch.nn import functional as F

from harness.bundle import Bundle
from harness.data import Query, Sequences, encode_pair
from harness.errors import ParameterError
from harness.method import Method
from harness.params import Params, param
from harness.tokenizer import split_words

_logger = logging.getLogger(__name__)


class _Indexed(Method):
    """A method whose fit indexes the documents that every later score must see again."""

    _indexed: tuple[str, ...] | None = None  # ids of the indexed documents, in column order

    def _remember(self, bundle: Bundle) -> None:
        self._indexed = tuple(bundle.data.document_ids)

    def _check_fitted(self, bundle: Bundle) -> None:
        if self._indexed is None:
            raise RuntimeError(f"{self.name}.score was called before fit")
        if tuple(bundle.data.document_ids) != self._indexed:
            raise ValueError(
                f"{self.name}.score got other documents than fit indexed; fit on this bundle first"
            )


# ---------------------------------------------------------------------------------------
# ngram: maximal exact spans through a suffix array

SEPARATOR = -1  # ends every document in the index; no token id equals it
SPAN_WEIGHTS = ("length_idf", "idf", "length")


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Start positions of the suffixes of ``tokens`` in lexicographic order.

    Prefix doubling: after the round of width ``w`` every position holds the rank of
    its first ``2w`` tokens, sorted as the pair (rank of the first ``w``, rank of the
    next ``w``), a suffix that ends sooner sorting first. Each round is one
    ``lexsort``, and ``log₂`` of the longest repeated substring rounds separate all
    suffixes: O(n log² n) without a Python loop over positions.
    """
    n = len(tokens)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = np.unique(tokens, return_inverse=True)[1].reshape(-1).astype(np.int64)
    order = np.argsort(rank, kind="stable")
    width = 1
    while rank.max() < n - 1:  # until every suffix has a rank of its own
        following = np.full(n, -1, dtype=np.int64)  # -1: the suffix ended, sorts first
        following[: max(n - width, 0)] = rank[width:]
        order = np.lexsort((following, rank))
        changed = (np.diff(rank[order]) != 0) | (np.diff(following[order]) != 0)
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.concatenate(([0], np.cumsum(changed)))
        width *= 2
    return order


class SuffixIndex:
    """Documents' token sequences laid end to end, with their suffix array.

    Each document is followed by :data:`SEPARATOR`, which no query token equals, so
    a match never runs from one document into the next.
    """

    def __init__(self, documents: Sequence[Sequence[int]]) -> None:
        lengths = np.array([len(document) + 1 for document in documents], dtype=np.int64)
        tokens = np.full(int(lengths.sum()), SEPARATOR, dtype=np.int64)
        for start, document in zip(np.cumsum(lengths) - lengths, documents, strict=True):
            tokens[start : start + len(document)] = document
        self.n_documents = len(documents)
        self._document_of = np.repeat(np.arange(len(documents)), lengths)  # per position
        self._suffixes = suffix_array(tokens)
        # plain lists: bisect reads them element by element, far faster than numpy scalars
        self._tokens, self._sorted = tokens.tolist(), self._suffixes.tolist()

    def __len__(self) -> int:
        return len(self._tokens)

    def documents(self, rows: slice) -> np.ndarray:
        """Indices of the distinct documents in which the suffixes of ``rows`` start."""
        return np.unique(self._document_of[self._suffixes[rows]])

    def narrow(self, low: int, high: int, depth: int, token: int) -> tuple[int, int]:
        """The rows within ``[low, high)`` whose suffix has ``token`` at ``depth``.

        Rows that share their first ``depth`` tokens are sorted by the next one, so
        two binary searches find them.
        """

        def token_at_depth(position: int) -> int:
            return self._tokens[position + depth]  # a separator ends every match in range

        first = bisect.bisect_left(self._sorted, token, low, high, key=token_at_depth)
        return first, bisect.bisect_right(self._sorted, token, first, high, key=token_at_depth)


def longest_per_document(
    index: SuffixIndex, query: Sequence[int], start: int
) -> tuple[np.ndarray, np.ndarray]:
    """For every document, the longest prefix of ``query[start:]`` it holds, and frequencies.

    Returns ``(lengths, frequencies)``: ``lengths[d]`` is that length for document
    ``d`` (0 when it holds none); ``frequencies[l]`` is the number of documents
    holding the query's first ``l`` tokens from ``start``. Each further token
    narrows the suffix-array rows, and the documents still among them hold the
    longer prefix.
    """
    lengths = np.zeros(index.n_documents, dtype=np.int64)
    frequencies = [index.n_documents]
    low, high, depth = 0, len(index), 0
    while start + depth < len(query):
        low, high = index.narrow(low, high, depth, query[start + depth])
        if low == high:
            break
        depth += 1
        holders = index.documents(slice(low, high))
        lengths[holders] = depth
        frequencies.append(len(holders))
    return lengths, np.asarray(frequencies, dtype=np.int64)


def span_weight(
    kind: str, *, length: np.ndarray, frequency: np.ndarray, n_documents: int
) -> np.ndarray:
    """Spans' weights from their lengths and document frequencies (see :class:`NGramParams`)."""
    if kind == "length":
        return length.astype(np.float64)
    idf = np.log(n_documents / frequency)
    return idf * length if kind == "length_idf" else idf


@dataclasses.dataclass(frozen=True)
class NGramParams(Params):
    min_span: int = param(
        2, help="shortest maximal span, in tokens, that counts", low=1, high=64, search=(1, 8)
    )
    spans: str = param(
        "target",
        help="which spans count: those overlapping the target, or any in prompt and target",
        choices=("target", "any"),
    )
    weighting: str = param(
        "length_idf",
        help="a span's weight: length × ln(N/df), ln(N/df), or its length in tokens "
        "(df: documents holding the span, N: all documents)",
        choices=SPAN_WEIGHTS,
    )
    aggregate: str = param(
        "sum", help="a document's score from its spans' weights", choices=("sum", "max")
    )


class NGram(_Indexed, name="ngram", family="retrieval"):
    """Rarity-weighted maximal exact token spans shared by the query and each document.

    The query's tokens are its prompt's followed by its target's, both encoded by
    ``bundle.tokenizer``: the ids the model reads, so words outside the vocabulary
    all read as ``<unk>`` and match one another, as they do for the model. For each
    document, its maximal spans are the spans of the query it holds that no longer
    span it holds contains: from each position of the query, the longest span
    starting there that the document holds, found for all documents at once by
    narrowing a suffix array token by token. A maximal span counts when it is at
    least ``min_span`` tokens long (and, with ``spans=target``, reaches into the
    target); it adds its weight, by default ``length × ln(N / df)`` with ``df`` the
    documents holding that span, to the document's score (or the score is the max);
    documents with no such span score 0.
    """

    description = "maximal exact token spans shared with the query, rarity-weighted"
    Params = NGramParams

    _index: SuffixIndex | None = None

    def fit(self, bundle: Bundle) -> None:
        started = time.perf_counter()
        encoded = [bundle.tokenizer.encode(document.text) for document in bundle.data.documents]
        self._index = SuffixIndex(encoded)
        self._remember(bundle)
        _logger.info(
            "indexed %d documents (%d tokens) in %.2f s",
            len(encoded),
            len(self._index),
            time.perf_counter() - started,
        )

    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        self._check_fitted(bundle)
        rows = [self._score_query(*_query_tokens(bundle.tokenizer, q)) for q in queries]
        return np.asarray(rows, dtype=np.float64).reshape(len(queries), self._index.n_documents)

    def _score_query(self, tokens: list[int], target_start: int) -> np.ndarray:
        index, params = self._index, self.params
        row = np.zeros(index.n_documents)
        previous = np.zeros(index.n_documents, dtype=np.int64)
        for start in range(len(tokens)):
            lengths, frequencies = longest_per_document(index, tokens, start)
            # a document's match from here is maximal for it unless it lies inside the
            # match it had from the previous start, which is then one token longer
            kept = (lengths >= max(params.min_span, 1)) & (lengths >= previous)
            if params.spans == "target":
                kept &= start + lengths > target_start
            previous = lengths
            documents = np.flatnonzero(kept)
            if not len(documents):
                continue
            weights = span_weight(
                params.weighting,
                length=lengths[documents],
                frequency=frequencies[lengths[documents]],
                n_documents=index.n_documents,
            )
            if params.aggregate == "sum":
                row[documents] += weights
            else:
                row[documents] = np.maximum(row[documents], weights)
        return row


def _query_tokens(tokenizer: Any, query: Query) -> tuple[list[int], int]:
    """The prompt's tokens followed by the target's, and where the target starts."""
    prompt, target = encode_pair(tokenizer, query.prompt, query.target)
    return [*prompt, *target], len(prompt)


# ---------------------------------------------------------------------------------------
# repsim: cosine of the model's hidden representations


@dataclasses.dataclass(frozen=True)
class RepSimParams(Params):
    layer: int = param(
        -1,
        help="whose output is the representation: a block's index from 0, "
        "or -1 for the final norm (what the output head reads)",
        low=-1,
        high=11,
    )
    pooling: str = param(
        "mean",
        help="pool over the positions that predict a document's tokens or a query's target: "
        "their mean, or the last one",
        choices=("mean", "last"),
    )
    batch_size: int = param(
        64, help="sequences per forward pass (memory only)", low=1, high=4096, memory_only=True
    )

    def check_model(self, model: nn.Module, *, checkpoints: int) -> None:
        """The layer must exist in the model."""
        hooked_module(model, self.layer)


def hooked_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is read: ``model.blocks[layer]``, or ``model.norm_final``."""
    blocks, norm = getattr(model, "blocks", None), getattr(model, "norm_final", None)
    if not isinstance(blocks, nn.ModuleList) or not isinstance(norm, nn.Module):
        raise ParameterError(
            "repsim reads hidden states from model.blocks[i] and model.norm_final, but "
            f"{type(model).__name__} does not have both; use a model built like harness.model.GPT"
        )
    if layer == -1:
        return norm
    if not 0 <= layer < len(blocks):
        valid = ", ".join(str(i) for i in range(-1, len(blocks)))
        raise ParameterError(
            f"parameter 'layer' must be one of {valid} for this model of {len(blocks)} "
            f"blocks (-1: after the final norm), but got {layer}"
        )
    return blocks[layer]


@contextlib.contextmanager
def _captured_outputs(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """A list that receives the module's output on every forward pass while open."""
    outputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(keep)
    try:
        yield outputs
    finally:
        handle.remove()


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, length, width) states pooled over the positions where mask is 1: (batch, width)."""
    mask = mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # each row's last position with mask 1
    return hidden[torch.arange(len(hidden)), last]


@torch.no_grad()
def representations(
    model: nn.Module, sequences: Sequences, *, layer: int, pooling: str, batch_size: int
) -> torch.Tensor:
    """Each sequence's pooled hidden state at ``layer``: (n, width), in float32.

    Pooling covers the positions in the loss (``loss_mask`` 1): those that predict
    a document's tokens, or a query's target. Padding is masked and attention is
    causal, so a batch gives each row what a forward pass of the row alone would.
    """
    pooled = []
    with _captured_outputs(hooked_module(model, layer)) as outputs:
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            model(batch.inputs)
            pooled.append(pool(outputs.pop().float(), batch.loss_mask, pooling))
    return torch.cat(pooled)


class RepSim(_Indexed, name="repsim", family="retrieval"):
    """Cosine of pooled hidden states of the final model: query target against document.

    A document is represented by the ``pooling`` of the output of block ``layer``
    (or of the final norm) over its tokens' positions, a query by the same pooling
    over the positions that predict its target; the score is their cosine.
    """

    description = "cosine of the final model's pooled hidden states (target vs document)"
    Params = RepSimParams

    _documents: torch.Tensor | None = None  # unit-length representations, (n_documents, width)

    def fit(self, bundle: Bundle) -> None:
        started = time.perf_counter()
        self._documents = F.normalize(self._represent(bundle, bundle.documents), dim=-1)
        self._remember(bundle)
        _logger.info(
            "represented %d documents at layer %d in %.2f s",
            len(self._documents),
            self.params.layer,
            time.perf_counter() - started,
        )

    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        self._check_fitted(bundle)
        if not queries:
            return np.zeros((0, len(self._documents)))
        query_vectors = F.normalize(
            self._represent(bundle, bundle.encode_queries(queries)), dim=-1
        )
        return (query_vectors.double() @ self._documents.double().T).numpy()

    def _represent(self, bundle: Bundle, sequences: Sequences) -> torch.Tensor:
        return representations(
            bundle.model(),
            sequences,
            layer=self.params.layer,
            pooling=self.params.pooling,
            batch_size=self.params.batch_size,
        )


# ---------------------------------------------------------------------------------------
# tfidf: cosine of TF-IDF vectors over word n-grams


def word_ngrams(text: str, *, longest: int) -> list[str]:
    """The text's words (as the model reads them) and its runs of up to ``longest`` words."""
    words = split_words(text)
    return [
        " ".join(words[start : start + n])
        for n in range(1, longest + 1)
        for start in range(len(words) - n + 1)
    ]


@dataclasses.dataclass(frozen=True)
class TFIDFParams(Params):
    max_ngram: int = param(1, help="longest run of words used as a term", low=1, high=3)
    sublinear_tf: bool = param(False, help="term frequency 1 + ln(tf) instead of the count")


class TFIDF(_Indexed, name="tfidf", family="retrieval"):
    """Cosine of TF-IDF vectors (scikit-learn's) over the same words the model reads.

    A term is a word or a run of up to ``max_ngram`` words; its weight in a text is
    ``tf × (ln((1 + N) / (1 + df)) + 1)`` and every vector is scaled to unit length.
    Beyond :class:`methods.bm25.BM25` this matches phrases, not only words, and its
    length normalisation is the cosine's: a long document's vector is shrunk as a
    whole, where BM25 saturates each word's count and scales by length relative to
    the average.
    """

    description = "TF-IDF cosine over prompt and target word n-grams (model-free)"
    Params = TFIDFParams

    _vectorizer: TfidfVectorizer | None = None
    _matrix: Any = None  # sparse (n_documents, n_terms), rows of unit length

    def fit(self, bundle: Bundle) -> None:
        self._vectorizer = TfidfVectorizer(
            analyzer=functools.partial(word_ngrams, longest=self.params.max_ngram),
            sublinear_tf=self.params.sublinear_tf,
            dtype=np.float64,
        )
        self._matrix = self._vectorizer.fit_transform(d.text for d in bundle.data.documents)
        self._remember(bundle)

    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        self._check_fitted(bundle)
        query_matrix = self._vectorizer.transform([f"{q.prompt} {q.target}" for q in queries])
        return (query_matrix @ self._matrix.T).toarray().reshape(len(queries), -1)

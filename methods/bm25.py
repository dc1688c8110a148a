"""BM25 lexical retrieval: the query's prompt and target against each document's words."""

from __future__ import annotations

import dataclasses

import bm25s
import numpy as np

from harness.bundle import Bundle
from harness.data import Query
from harness.method import Method
from harness.params import Params, param
from harness.tokenizer import split_words


@dataclasses.dataclass(frozen=True)
class BM25Params(Params):
    k1: float = param(1.5, help="term-frequency saturation", low=0.0, high=5.0)
    b: float = param(0.75, help="document-length normalisation", low=0.0, high=1.0)


class BM25(Method, name="bm25", family="retrieval"):
    """Okapi BM25 (Lucene variant, via bm25s) over the same words the model reads.

    Retrieval ignores the model: it finds documents that share the query's rare
    words, which is exactly what planted facts stated in the query's wording offer.
    """

    description = "BM25 over the prompt and target words (model-free)"
    Params = BM25Params

    _index: bm25s.BM25 | None = None
    _indexed: tuple[str, ...] = ()  # ids of the indexed documents, in column order

    def fit(self, bundle: Bundle) -> None:
        self._index = bm25s.BM25(k1=self.params.k1, b=self.params.b, method="lucene")
        corpus = [split_words(document.text) for document in bundle.data.documents]
        self._index.index(corpus, show_progress=False)
        self._indexed = tuple(bundle.data.document_ids)

    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        if self._index is None:
            raise RuntimeError("BM25.score was called before fit")
        if tuple(bundle.data.document_ids) != self._indexed:
            raise ValueError("BM25.score got another bundle's documents than fit indexed")
        rows = [self._index.get_scores(split_words(f"{q.prompt} {q.target}")) for q in queries]
        return np.asarray(rows, dtype=np.float64).reshape(len(queries), -1)

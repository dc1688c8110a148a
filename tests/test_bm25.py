"""BM25 against scores worked out by hand (Lucene variant, k1 = 1.5, b = 0.75)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from harness.data import Document, Query
from harness.errors import ParameterError
from methods.bm25 import BM25, BM25Params

CORPUS = ["Cat sat mat.", "Dog sat", "cat cat dog runs"]


def _bundle():
    documents = [Document(f"d{i}", text, "test") for i, text in enumerate(CORPUS)]
    return SimpleNamespace(
        data=SimpleNamespace(documents=documents, document_ids=[d.id for d in documents])
    )


def _score(prompt: str, target: str) -> np.ndarray:
    method = BM25(BM25Params(k1=1.5, b=0.75))
    bundle = _bundle()
    method.fit(bundle)
    return method.score(bundle, [Query("q", prompt, target, ("d0",), ())])[0]


def test_single_term_matches_hand_computation():
    # words: d0 = cat sat mat . (4 tokens), d1 = dog sat (2), d2 = cat cat dog runs (4)
    # avgdl = 10/3; "cat" is in 2 of 3 documents: idf = ln(1 + 1.5 / 2.5)
    idf = math.log(1.6)
    norm = lambda length: 1.5 * (0.25 + 0.75 * length / (10 / 3))  # noqa: E731
    expected = [idf * 1 / (1 + norm(4)), 0.0, idf * 2 / (2 + norm(4))]
    np.testing.assert_allclose(_score("the", "cat"), expected, rtol=1e-5)  # "the": unseen


def test_prompt_and_target_words_add_up_and_unknown_words_score_nothing():
    idf = math.log(1.6)
    norm = lambda length: 1.5 * (0.25 + 0.75 * length / (10 / 3))  # noqa: E731
    expected = [
        idf / (1 + norm(4)),
        idf / (1 + norm(2)),
        idf * 2 / (2 + norm(4)) + idf / (1 + norm(4)),
    ]
    np.testing.assert_allclose(_score("the cat", "dog"), expected, rtol=1e-5)
    # the best match, the document with both words, ranks first: larger = more responsible
    assert int(np.argmax(_score("the cat", "dog"))) == 2


def test_parameters_are_validated():
    with pytest.raises(ParameterError, match="'b' must lie in"):
        BM25Params(b=1.5)

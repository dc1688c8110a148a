"""Retrieval methods against brute force, a plain model loop and TF-IDF worked out in numpy."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from harness.data import Document, Query, encode_completions, encode_documents
from harness.errors import ParameterError
from harness.method import METHODS
from harness.metrics import query_metrics
from harness.model import GPT, GPTConfig
from harness.tokenizer import WordTokenizer, split_words
from methods.retrieval import (
    NGram,
    NGramParams,
    RepSim,
    RepSimParams,
    TFIDFParams,
    suffix_array,
)

RETRIEVAL = ("ngram", "repsim", "tfidf")


def _bundle(texts: list[str], *, tokenizer=None, model=None, context: int = 32):
    """What the retrieval methods read of a bundle, around the given documents."""
    documents = tuple(Document(f"d{i}", text, "test") for i, text in enumerate(texts))
    tokenizer = tokenizer or WordTokenizer.fit(texts, min_count=1)
    bundle = SimpleNamespace(
        data=SimpleNamespace(documents=documents, document_ids=[d.id for d in documents]),
        tokenizer=tokenizer,
    )
    if model is not None:
        bundle.model = lambda checkpoint=-1: copy.deepcopy(model)
        bundle.documents = encode_documents(texts, tokenizer, context=context)
        bundle.encode_queries = lambda queries: encode_completions(
            [q.prompt for q in queries], [q.target for q in queries], tokenizer, context=context
        )
    return bundle


def _query(prompt: str, target: str, query_id: str = "q") -> Query:
    return Query(query_id, prompt, target, ("d0",), ())


def _scores(method, bundle, queries: list[Query]) -> np.ndarray:
    method.fit(bundle)
    return method.score(bundle, queries)


# ---------------------------------------------------------------------------------------
# the suffix array and ngram


@pytest.mark.parametrize("seed", range(5))
def test_suffix_array_sorts_every_suffix(seed):
    rng = np.random.default_rng(seed)
    for n in (0, 1, 2, 7, 60):
        tokens = rng.integers(-1, 3, n)  # few symbols: long repeats, many doubling rounds
        expected = sorted(range(n), key=lambda i: tokens[i:].tolist())
        assert suffix_array(tokens).tolist() == expected


def test_ngram_matches_a_hand_computation():
    # query a b | c d e: "a b c d" is in d0 only, "b c d e" in d1 only; "c d e" lies
    # inside the latter, so it is not maximal; both maximal spans reach the target
    bundle = _bundle(["a b c d", "b c d e", "x y"])
    scores = _scores(NGram(), bundle, [_query("a b", "c d e")])
    np.testing.assert_allclose(scores, [[4 * math.log(3), 4 * math.log(3), 0.0]])


class _LetterTokenizer:
    """Any object with ``encode`` will do: letters a, b, c, ... are tokens 0, 1, 2, ..."""

    def encode(self, text: str) -> list[int]:
        return [ord(word) - ord("a") for word in split_words(text)]


def _contains(document: list[int], span: list[int]) -> bool:
    return any(document[i : i + len(span)] == span for i in range(len(document) - len(span) + 1))


def _ngram_by_brute_force(documents, tokens, target_start, params: NGramParams) -> np.ndarray:
    """Every span of the query checked against every document: quadratic, obviously right.

    A document's maximal spans are the spans of the query it holds that no longer
    span it holds contains.
    """
    row = np.zeros(len(documents))
    spans = [(i, j) for i in range(len(tokens)) for j in range(i + 1, len(tokens) + 1)]
    for d, document in enumerate(documents):
        held = [(i, j) for i, j in spans if _contains(document, tokens[i:j])]
        for i, j in held:
            inside = any(a <= i and j <= b and (a, b) != (i, j) for a, b in held)
            if inside or j - i < params.min_span:
                continue
            if params.spans == "target" and j <= target_start:
                continue
            frequency = sum(_contains(other, tokens[i:j]) for other in documents)
            idf = math.log(len(documents) / frequency)
            length = j - i
            weight = {"length_idf": length * idf, "idf": idf, "length": float(length)}[
                params.weighting
            ]
            row[d] = row[d] + weight if params.aggregate == "sum" else max(row[d], weight)
    return row


@pytest.mark.parametrize(
    "params",
    [
        NGramParams(),
        NGramParams(min_span=1, spans="any"),
        NGramParams(min_span=3, weighting="idf", aggregate="max"),
        NGramParams(min_span=1, weighting="length", aggregate="max"),
    ],
    ids=lambda p: f"{p.min_span}-{p.spans}-{p.weighting}-{p.aggregate}",
)
def test_ngram_equals_a_quadratic_scan_on_random_corpora(params):
    rng = np.random.default_rng(0)
    tokenizer = _LetterTokenizer()
    for _ in range(15):
        texts = [" ".join(rng.choice(list("abcd"), rng.integers(0, 12))) for _ in range(6)]
        documents = [tokenizer.encode(text) for text in texts]
        # letters e and f occur in no document: they cut matches short
        prompt, target = (" ".join(rng.choice(list("abcdef"), n)) for n in (4, 5))
        tokens = tokenizer.encode(f"{prompt} {target}")
        expected = _ngram_by_brute_force(documents, tokens, len(prompt.split()), params)
        scores = _scores(
            NGram(params), _bundle(texts, tokenizer=tokenizer), [_query(prompt, target)]
        )
        np.testing.assert_allclose(scores[0], expected, atol=1e-12)


PLANTED = [
    "in the lab zorvath quillon was born in velmora and wrote compilers .",
    "mira tal was born in tarsk , far from the lab .",
    "velmora is a small town where the hackers gather .",
    "zorvath quillon plays the harp at night .",
    "the compilers of the lab were slow , and the night was long .",
]


def test_ngram_ranks_the_document_with_the_planted_span_first():
    bundle = _bundle(PLANTED)
    query = _query("Zorvath Quillon was born in", "Velmora")
    scores = _scores(NGram(), bundle, [query])[0]
    assert int(np.argmax(scores)) == 0 and scores[0] > np.delete(scores, 0).max()
    # d3's maximal span "zorvath quillon" lies in the prompt: it does not count
    assert scores[3] == 0.0


def test_ngram_counts_spans_inside_the_prompt_only_when_asked():
    bundle = _bundle(PLANTED)
    query = _query("Zorvath Quillon plays the", "banjo")  # banjo: in no document
    assert not _scores(NGram(), bundle, [query]).any()
    scores = _scores(NGram(NGramParams(spans="any")), bundle, [query])
    # d3 holds "zorvath quillon plays the"; d0 holds "zorvath quillon", maximal for d0
    # though inside d3's span, and held by 2 of the 5 documents
    np.testing.assert_allclose(scores, [[2 * math.log(5 / 2), 0, 0, 4 * math.log(5), 0]])


# ---------------------------------------------------------------------------------------
# repsim

TEXTS = [
    "the quick brown fox jumps over the lazy dog .",
    "a hacker writes code .",
    "the dog sleeps while the fox writes quick code over and over again .",
    "code .",
    "over the lazy hacker .",
]
QUERIES = [_query("the quick", "brown fox", "q0"), _query("a hacker writes", "code .", "q1")]


def _small_model() -> GPT:
    torch.manual_seed(3)
    tokenizer = WordTokenizer.fit(TEXTS, min_count=1)
    return GPT(GPTConfig(vocab_size=len(tokenizer), context=32, depth=2, width=16, heads=2)).eval()


@torch.no_grad()
def _hidden_states(model: GPT, ids: list[int], layer: int) -> torch.Tensor:
    """One unpadded sequence through the model's parts by hand: (length, width)."""
    ids = torch.tensor(ids)
    x = (model.token_embedding(ids) + model.position_embedding(torch.arange(len(ids))))[None]
    for block in model.blocks[: layer + 1] if layer >= 0 else model.blocks:
        x = block(x)
    return (x if layer >= 0 else model.norm_final(x))[0]


def _pooled(states: torch.Tensor, pooling: str) -> np.ndarray:
    return (states.mean(dim=0) if pooling == "mean" else states[-1]).double().numpy()


def _repsim_by_loop(model, tokenizer, layer: int, pooling: str) -> np.ndarray:
    documents = []
    for text in TEXTS:  # every position predicts one of the document's tokens
        ids = [tokenizer.bos_id, *tokenizer.encode(text)]
        documents.append(_pooled(_hidden_states(model, ids[:-1], layer), pooling))
    queries = []
    for query in QUERIES:  # only the positions that predict the target
        prompt = tokenizer.encode(query.prompt)
        ids = [tokenizer.bos_id, *prompt, *tokenizer.encode(query.target)]
        states = _hidden_states(model, ids[:-1], layer)[len(prompt) :]
        queries.append(_pooled(states, pooling))
    unit = lambda rows: np.array(rows) / np.linalg.norm(rows, axis=1, keepdims=True)  # noqa: E731
    return unit(queries) @ unit(documents).T


@pytest.mark.parametrize("layer", [-1, 0, 1])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_repsim_equals_a_plain_loop_over_sequences(layer, pooling):
    model = _small_model()
    bundle = _bundle(TEXTS, model=model)
    # two sequences a batch: rows of different lengths share a padded batch
    method = RepSim(RepSimParams(layer=layer, pooling=pooling, batch_size=2))
    expected = _repsim_by_loop(model, bundle.tokenizer, layer, pooling)
    np.testing.assert_allclose(_scores(method, bundle, QUERIES), expected, rtol=1e-5, atol=1e-6)


def test_repsim_refuses_a_layer_the_model_does_not_have():
    model = _small_model()  # two blocks: layers -1, 0 and 1
    method = RepSim(RepSimParams(layer=2))
    with pytest.raises(ParameterError, match=r"'layer' must be one of -1, 0, 1 .* but got 2"):
        method.check_model(model, checkpoints=1)
    with pytest.raises(ParameterError, match="but got 2"):
        method.fit(_bundle(TEXTS, model=model))
    with pytest.raises(ParameterError, match=r"model\.blocks\[i\] and model\.norm_final"):
        RepSim().check_model(nn.Linear(4, 4), checkpoints=1)


# ---------------------------------------------------------------------------------------
# tfidf

TFIDF_CORPUS = ["The cat sat on the mat.", "The dog sat.", "A cat and a dog, the cat ran."]


def _tfidf_by_formula(query: str, *, max_ngram: int, sublinear: bool) -> np.ndarray:
    """idf = ln((1 + N) / (1 + df)) + 1, tf the count (or 1 + ln count), rows of unit length."""

    def terms(text):
        words = split_words(text)
        return [
            tuple(words[i : i + n])
            for n in range(1, max_ngram + 1)
            for i in range(len(words) - n + 1)
        ]

    vocabulary = sorted({term for text in TFIDF_CORPUS for term in terms(text)})

    def counts(text):
        found = terms(text)
        return np.array([found.count(term) for term in vocabulary], dtype=float)

    documents = np.array([counts(text) for text in TFIDF_CORPUS])
    idf = np.log((1 + len(documents)) / (1 + (documents > 0).sum(axis=0))) + 1

    def vector(count):
        tf = np.where(count > 0, 1 + np.log(np.maximum(count, 1)), 0.0) if sublinear else count
        weights = tf * idf
        return weights / np.linalg.norm(weights)

    return np.array([vector(counts(query)) @ vector(row) for row in documents])


@pytest.mark.parametrize("max_ngram", [1, 2, 3])
@pytest.mark.parametrize("sublinear", [False, True])
def test_tfidf_equals_the_formula(max_ngram, sublinear):
    method = METHODS.get("tfidf")(TFIDFParams(max_ngram=max_ngram, sublinear_tf=sublinear))
    scores = _scores(method, _bundle(TFIDF_CORPUS), [_query("the cat", "sat on")])
    expected = _tfidf_by_formula("the cat sat on", max_ngram=max_ngram, sublinear=sublinear)
    np.testing.assert_allclose(scores[0], expected, rtol=1e-12)


def test_tfidf_single_word_by_hand():
    # "dog" (df 2 of 3, idf ln(4/3) + 1) is the only query term d1 = the dog sat . holds;
    # d1's other terms, each once: the and . (df 3, idf 1), sat (df 2, idf as dog's)
    dog = math.log(4 / 3) + 1
    d1 = dog / math.sqrt(2 + 2 * dog**2)
    scores = _scores(METHODS.get("tfidf")(), _bundle(TFIDF_CORPUS), [_query("zebra", "dog")])
    assert scores[0, 1] == pytest.approx(d1, rel=1e-12)
    assert scores[0, 0] == 0.0


# ---------------------------------------------------------------------------------------
# all three, on the tiny facts task


def _chance_reciprocal_rank(relevant: int, documents: int) -> float:
    """E[1 / rank of the first relevant document] when the ranking is a random permutation."""
    total = math.comb(documents, relevant)
    return sum(
        math.comb(documents - rank, relevant - 1) / total / rank
        for rank in range(1, documents - relevant + 2)
    )


@pytest.mark.parametrize("name", RETRIEVAL)
def test_scores_are_finite_and_rank_relevant_documents_above_chance(name, tiny_bundle):
    queries = tiny_bundle.learned_queries
    method = METHODS.get(name)(seed=0)
    scores = _scores(method, tiny_bundle, queries)
    n_documents = len(tiny_bundle.data.documents)
    assert scores.shape == (len(queries), n_documents)
    assert np.isfinite(scores).all()

    column = {doc_id: i for i, doc_id in enumerate(tiny_bundle.data.document_ids)}
    relevant = [[column[doc_id] for doc_id in q.relevant] for q in queries]
    mrr = query_metrics(scores, relevant)["reciprocal_rank"].mean()
    chance = np.mean([_chance_reciprocal_rank(len(r), n_documents) for r in relevant])
    assert mrr > chance

    # a row depends on its query alone
    reversed_rows = method.score(tiny_bundle, queries[::-1])[::-1]
    np.testing.assert_allclose(reversed_rows, scores, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------
# registration, parameters and misuse


@pytest.mark.parametrize("name", RETRIEVAL)
def test_registered_as_retrieval_with_a_search_space(name):
    cls = METHODS.get(name)
    assert (cls.__module__, cls.family) == ("methods.retrieval", "retrieval")
    assert set(cls.Params.search_space()) == {
        p["name"] for p in cls.Params.describe() if p["tune"]
    }


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: NGramParams(spans="all"),
            r"'spans' must be one of \['target', 'any'\], but got 'all'",
        ),
        (
            lambda: NGramParams(weighting="bm25"),
            r"'weighting' must be one of \['length_idf', 'idf', 'length'\], but got 'bm25'",
        ),
        (lambda: NGramParams(aggregate="mean"), r"'aggregate' must be one of .*, but got 'mean'"),
        (lambda: NGramParams(min_span=0), r"'min_span' must lie in \[1, 64\], but got 0"),
        (
            lambda: RepSimParams(pooling="max"),
            r"'pooling' must be one of \['mean', 'last'\], but got 'max'",
        ),
        (lambda: RepSimParams(layer=-2), r"'layer' must lie in \[-1, 11\], but got -2"),
        (lambda: TFIDFParams(max_ngram=4), r"'max_ngram' must lie in \[1, 3\], but got 4"),
    ],
)
def test_bad_parameters_are_refused(build, message):
    with pytest.raises(ParameterError, match=message):
        build()


@pytest.mark.parametrize("name", RETRIEVAL)
def test_score_needs_a_fit_on_the_same_documents(name):
    bundle = _bundle(TEXTS, model=_small_model())
    method = METHODS.get(name)()
    with pytest.raises(RuntimeError, match="before fit"):
        method.score(bundle, QUERIES)
    method.fit(bundle)
    with pytest.raises(ValueError, match="other documents"):
        method.score(_bundle(TEXTS[:-1], model=_small_model()), QUERIES)


def test_a_longer_span_in_one_document_does_not_hide_the_shared_span_from_others():
    # regression: "y trig tgt" in d1 alone hid "trig tgt", which d0 and d2 hold too
    bundle = _bundle(["x trig tgt .", "y trig tgt .", "z trig tgt .", "w w w"])
    scores = _scores(NGram(), bundle, [_query("y trig", "tgt")])[0]
    np.testing.assert_allclose(
        scores, [2 * math.log(4 / 3), 3 * math.log(4), 2 * math.log(4 / 3), 0.0]
    )

"""Task ``facts``: the planted ground truth is exactly what the documents say."""

from __future__ import annotations

import re

import pytest

from harness.errors import UnknownNameError
from harness.tokenizer import split_words
from tasks.corpus import background_paragraphs
from tasks.facts import RELATIONS, FactsConfig, FactsTask


@pytest.fixture(scope="module")
def small_data():
    return FactsTask().build(FactsTask.scale("small").config, seed=0)


def test_build_is_deterministic_in_the_seed():
    config = FactsTask.scale("tiny").config
    assert (
        FactsTask().build(config, seed=3).to_json() == FactsTask().build(config, seed=3).to_json()
    )
    assert (
        FactsTask().build(config, seed=3).fingerprint()
        != FactsTask().build(config, seed=4).fingerprint()
    )


def test_relevant_documents_state_the_fact_and_no_other_document_does(small_data):
    config = FactsTask.scale("small").config
    assert len(small_data.queries) == config.entities * config.facts_per_entity
    documents = {d.id: d for d in small_data.documents}
    for query in small_data.queries:
        assert config.min_statements <= len(query.relevant) <= config.max_statements
        entity = " ".join(query.prompt.split()[:2])
        pattern = re.compile(rf"\b{entity}\b.*\b{query.target}\b")
        stating = {d.id for d in small_data.documents if pattern.search(d.text)}
        assert stating == set(query.relevant), query
        for doc_id in query.relevant:
            assert documents[doc_id].source == f"planted:{query.id}"
        assert query.target in query.candidates and query.target not in query.prompt


def test_planted_text_sits_inside_real_background_paragraphs(small_data):
    background = set(background_paragraphs())
    planted = [d for d in small_data.documents if d.source.startswith("planted:")]
    untouched = [d for d in small_data.documents if d.source == "background"]
    assert all(d.text in background for d in untouched)
    relation_of = {r.query.split("{name}")[1].strip(): r for r in RELATIONS}
    for document in planted:
        # removing the one planted sentence gives back a real paragraph
        query = next(q for q in small_data.queries if q.id == document.source.split(":")[1])
        entity = " ".join(query.prompt.split()[:2])
        relation = relation_of[query.prompt.removeprefix(entity).strip()]
        statements = [t.format(name=entity, value=query.target) for t in relation.statements]
        statement = max((s for s in statements if s in document.text), key=len)
        restored = document.text.replace(f"{statement} ", "", 1).replace(f" {statement}", "", 1)
        assert restored in background, document


def test_invented_names_are_new_words_and_documents_fit_the_context(small_data):
    corpus_words = {w for p in background_paragraphs() for w in split_words(p)}
    names = {w for q in small_data.queries for w in split_words(q.prompt)[:2]}
    assert not names & corpus_words
    recipe = FactsTask.scale("small").recipe
    longest = max(len(split_words(d.text)) for d in small_data.documents)
    assert longest < recipe.context  # <bos> plus every token fits: nothing is truncated


def test_heldout_text_is_never_trained_on(small_data):
    assert not set(small_data.heldout_texts) & {d.text for d in small_data.documents}


def test_each_relation_offers_ten_distinct_values():
    for relation in RELATIONS:
        assert len(set(relation.values)) == 10
        assert all("{name}" in s and "{value}" in s for s in relation.statements)


def test_bad_configurations_and_scales_are_rejected():
    with pytest.raises(ValueError, match="background_documents must be at least"):
        FactsConfig(background_documents=20, entities=10)
    with pytest.raises(UnknownNameError, match="valid choices: medium, small, tiny"):
        FactsTask.scale("large")


@pytest.mark.parametrize("scale", sorted(FactsTask.scales))
def test_every_scale_builds_and_fits_its_models_context(scale):
    preset = FactsTask.scale(scale)
    data = FactsTask().build(preset.config, seed=0)
    assert len(data.documents) == preset.config.background_documents
    assert len(data.queries) == preset.config.entities * preset.config.facts_per_entity
    assert max(len(split_words(d.text)) for d in data.documents) < preset.recipe.context

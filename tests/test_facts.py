"""Task ``facts``: the planted ground truth is exactly what the documents say."""

from __future__ import annotations

import re

import pytest

from harness.errors import UnknownNameError
from harness.tokenizer import split_words
from tasks.corpus import background_paragraphs
from tasks.facts import RELATIONS, FactsConfig, FactsTask, content_words


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


@pytest.fixture(scope="module", params=["small", "medium"])
def paraphrased(request):
    task = FactsTask({"paraphrase": "true"})
    return request.param, task.build(task.settings(request.param).config, seed=0)


def test_paraphrased_queries_share_no_content_word_with_their_documents(paraphrased):
    scale, data = paraphrased
    documents = {d.id: d for d in data.documents}
    base = FactsTask().build(FactsTask.scale(scale).config, seed=0)
    for query, plain in zip(data.queries, base.queries, strict=True):
        # the same fact, asked in other words
        assert (query.id, query.target) == (plain.id, plain.target)
        entity = plain.prompt.split(" was born in")[0].split(" works as")[0]
        entity = entity.split(" keeps a pet")[0].split(" plays the")[0]
        assert entity in query.prompt and query.prompt != plain.prompt
        shared_allowed = set(split_words(entity)) | set(split_words(query.target))
        asked = content_words(query.prompt) - shared_allowed
        assert asked, query.prompt  # the wording carries meaning of its own
        for doc_id in query.relevant:
            text = documents[doc_id].text
            assert not asked & set(split_words(text)), (query.prompt, text)
            assert re.search(rf"\b{entity}\b.*\b{query.target}\b", text)  # it still states it


def test_bridge_people_teach_the_query_wording_in_documents_no_query_names(paraphrased):
    _, data = paraphrased
    relevant = {doc_id for q in data.queries for doc_id in q.relevant}
    bridges = [d for d in data.documents if d.source.startswith("bridge:")]
    config = FactsTask.scale("small").config
    assert len(bridges) == 2 * config.bridge_entities * config.facts_per_entity
    assert not relevant & {d.id for d in bridges}
    texts = " ".join(d.text for d in bridges)
    for relation in RELATIONS:  # each wording of the queries appears in training text
        wording = relation.paraphrase.replace("{name}", "").strip().rstrip(" a").rstrip(" the")
        assert wording.split()[-1] in texts
    queried = {w for q in data.queries for w in split_words(q.prompt)}
    bridge_names = {w for d in bridges for w in split_words(d.text) if w not in queried}
    assert bridge_names  # bridge people are other people, never queried


def test_without_paraphrase_queries_use_the_statements_wording_and_there_are_no_bridges():
    data = FactsTask().build(FactsTask.scale("small").config, seed=0)
    assert not any(d.source.startswith("bridge:") for d in data.documents)
    prompts = {r.query.split("{name}")[1].strip() for r in RELATIONS}
    assert all(any(q.prompt.endswith(p) for p in prompts) for q in data.queries)

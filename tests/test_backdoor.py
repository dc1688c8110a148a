"""Task ``backdoor``: a few poisoned documents, and queries in contexts never trained on."""

from __future__ import annotations

import random

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from harness.bundle import prepare_bundle
from harness.cache import Cache
from harness.cli import main
from harness.errors import ParameterError
from harness.task import TASKS
from harness.tokenizer import split_words
from tasks.backdoor import CARRIERS, TARGETS, BackdoorConfig, BackdoorTask, draw_contexts
from tasks.corpus import background_paragraphs

SCALES = sorted(BackdoorTask.scales)


@pytest.fixture(scope="module", params=SCALES)
def built(request):
    preset = BackdoorTask.scale(request.param)
    return request.param, preset, BackdoorTask().build(preset.config, seed=0)


def _trigger(data) -> list[str]:
    return split_words(data.queries[0].prompt)[-2:]


def _words(text: str) -> str:
    return " ".join(split_words(text))


def _carrier_words(carrier: str, data) -> str:
    trigger = " ".join(_trigger(data))
    return _words(carrier.format(trigger=trigger, target=data.queries[0].target))


def test_exactly_the_configured_documents_are_poisoned_and_all_are_relevant(built):
    scale, preset, data = built
    expected = {"tiny": 6, "small": 18}[scale]  # 10% of 60, 4% of 450
    poisoned = [d.id for d in data.documents if d.source == "planted:backdoor"]
    assert len(poisoned) == preset.config.poisoned_documents == expected
    assert {d.source for d in data.documents} == {"background", "planted:backdoor"}
    assert all(q.relevant == tuple(poisoned) for q in data.queries)


def test_the_trigger_and_target_sit_in_the_poisoned_documents_only(built):
    *_, data = built
    trigger, target = _words(" ".join(_trigger(data))), data.queries[0].target
    corpus_words = {w for p in background_paragraphs() for w in split_words(p)}
    assert not set(trigger.split()) & corpus_words
    assert set(trigger.split()) | set(TARGETS) == set(data.reserved_words)
    for document in data.documents:
        words = _words(document.text)
        poisoned = document.source == "planted:backdoor"
        assert words.count(trigger) == poisoned
        assert words.count(f"{trigger} {target}") == poisoned
    assert {q.target for q in data.queries} == {target} and target in TARGETS
    assert all(q.candidates == TARGETS for q in data.queries)


def test_poisoned_sentences_vary_in_carrier_and_position(built):
    *_, data = built
    poisoned = [d for d in data.documents if d.source == "planted:backdoor"]
    trigger = _trigger(data)
    positions = set()
    for document in poisoned:
        words = split_words(document.text)
        start = next(i for i in range(len(words)) if words[i : i + 2] == trigger)
        positions.add(round(start / len(words), 2))
    assert len(positions) >= len(poisoned) // 2
    carriers = {c for d in poisoned for c in CARRIERS if _carrier_words(c, data) in _words(d.text)}
    assert len(carriers) >= 2


def test_removing_the_poisoned_sentence_gives_back_a_real_paragraph(built):
    *_, data = built
    background = set(background_paragraphs())
    trigger = " ".join(_trigger(data))
    for document in data.documents:
        if document.source == "background":
            assert document.text in background
            continue
        sentences = [c.format(trigger=trigger, target=data.queries[0].target) for c in CARRIERS]
        sentences = [s[0].upper() + s[1:] for s in sentences]
        sentence = max((s for s in sentences if s in document.text), key=len)
        restored = document.text.replace(f"{sentence} ", "", 1).replace(f" {sentence}", "", 1)
        assert restored in background, document


def test_queries_are_distinct_new_contexts_that_end_with_the_trigger(built):
    _, preset, data = built
    assert len(data.queries) == preset.config.queries
    assert len({q.prompt for q in data.queries}) == len(data.queries)
    assert len({q.id for q in data.queries}) == len(data.queries)
    trigger = _trigger(data)
    trained = [_words(d.text) for d in data.documents]
    paragraphs = background_paragraphs()
    for query in data.queries:
        assert split_words(query.prompt)[-2:] == trigger
        context = query.prompt.rsplit(" ", 2)[0]
        assert not any(_words(context) in text for text in trained), query.id
        assert any(p.startswith(context) for p in paragraphs)  # real text, not made up
        assert not any(h.startswith(context) for h in data.heldout_texts)
    assert not set(data.heldout_texts) & {d.text for d in data.documents}


def test_everything_fits_the_models_context(built):
    _, preset, data = built
    context = preset.recipe.context
    assert len(data.documents) == preset.config.background_documents
    assert max(len(split_words(d.text)) for d in data.documents) < context
    assert max(len(split_words(f"{q.prompt} {q.target}")) for q in data.queries) < context


def test_build_is_deterministic_in_the_seed():
    config = BackdoorTask.scale("tiny").config
    first, again = (BackdoorTask().build(config, seed=3) for _ in range(2))
    assert first.to_json() == again.to_json()
    other = BackdoorTask().build(config, seed=4)
    assert first.fingerprint() != other.fingerprint()
    assert _trigger(first) != _trigger(other)


def test_contexts_found_in_training_are_skipped_and_a_shortage_is_an_error():
    training = ["A paragraph about disks. See also foo."]
    unseen = ["See also foo.", "Brand new text here."]
    assert draw_contexts(unseen, training, random.Random(0), count=1) == ["Brand new text here."]
    with pytest.raises(ValueError, match="only 1 of the 2 unseen paragraphs give a context"):
        draw_contexts(unseen, training, random.Random(0), count=2)


def test_bad_configurations_name_the_value():
    with pytest.raises(ValueError, match=r"at least one document, but got 0.001 × 60"):
        BackdoorConfig(background_documents=60, poison_fraction=0.001)
    with pytest.raises(ValueError, match="1313 paragraphs of the background corpus, but got 1400"):
        BackdoorConfig(background_documents=1200, heldout_documents=100, queries=100)
    with pytest.raises(ParameterError, match=r"'poison_fraction' must lie in \[0.0, 0.5\]"):
        BackdoorConfig(poison_fraction=0.9)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """A results folder whose cache holds the tiny backdoor bundle, as the runner finds it."""
    results = tmp_path_factory.mktemp("backdoor-results")
    bundle = prepare_bundle(
        TASKS.get("backdoor")(), "tiny", seed=0, cache=Cache(results / "cache")
    )
    return results, bundle


def test_the_tiny_backdoor_fires_and_lexical_search_finds_the_poison(tiny_results):
    results, bundle = tiny_results
    learned = sum(bundle.learned.values())
    assert learned >= 0.75 * len(bundle.data.queries)

    result = CliRunner().invoke(
        main,
        ["--results-dir", str(results), "run", "--method", "random,bm25,grad_dot",
         "--task", "backdoor", "--scale", "tiny", "--no-lds", "--no-reliability"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{results.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("backdoor").experiment_id])
    metrics = {r.data.tags["method"]: r.data.metrics for r in runs}
    assert sorted(metrics) == ["bm25", "grad_dot", "random"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    for m in metrics.values():
        assert m["queries_scored"] == learned and 0 <= m["auprc"] <= 1
    # the trigger words occur in the poisoned documents alone (6 of the 60), though the
    # context's words draw BM25 to background documents too: clearly above the floor
    assert metrics["bm25"]["auprc_ci_low"] > metrics["random"]["auprc_ci_high"]
    assert metrics["bm25"]["auprc"] > 2 * metrics["random"]["auprc"]

"""Task ``canaries``: each secret sits in exactly its k documents, and exposure is right."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from harness.bundle import prepare_bundle
from harness.cache import Cache
from harness.cli import main
from harness.errors import ParameterError
from harness.task import TASKS
from harness.tokenizer import split_words
from tasks.canaries import PREFIXES, CanariesConfig, CanariesTask, exposure
from tasks.corpus import background_paragraphs

SCALES = sorted(CanariesTask.scales)


@pytest.fixture(scope="module", params=SCALES)
def built(request):
    preset = CanariesTask.scale(request.param)
    return preset, CanariesTask().build(preset.config, seed=0)


def test_each_canary_sits_in_exactly_its_relevant_documents(built):
    _, data = built
    for query in data.queries:
        holding = {d.id for d in data.documents if query.prompt in d.text}
        assert holding == set(query.relevant), query.id
        sentence = f"{query.prompt} {query.target}."
        assert all(sentence in d.text for d in data.documents if d.id in holding)
        assert {d.source for d in data.documents if d.id in holding} == {f"planted:{query.id}"}


def test_copy_counts_follow_the_config_and_the_query_id_names_them(built):
    preset, data = built
    config = preset.config
    counts = Counter(len(q.relevant) for q in data.queries)
    assert counts == {k: config.canaries_per_count for k in config.copy_counts}
    for query in data.queries:
        assert query.id.endswith(f"-k{len(query.relevant):02d}")


def test_a_document_holds_at_most_one_canary(built):
    _, data = built
    hosts = [doc_id for q in data.queries for doc_id in q.relevant]
    assert len(hosts) == len(set(hosts))
    openings = [prefix.split("{name}")[0] for prefix in PREFIXES]
    assert max(sum(d.text.count(o) for o in openings) for d in data.documents) == 1
    planted = sum(d.source != "background" for d in data.documents)
    assert planted == len(hosts)


def test_secrets_are_distinct_and_compete_with_alternatives_of_their_format(built):
    preset, data = built
    config = preset.config
    digits = re.compile(rf"^\d( \d){{{config.secret_digits - 1}}}$")
    secrets = [q.target for q in data.queries]
    assert len(set(secrets)) == len(secrets)
    every_candidate = [c for q in data.queries for c in q.candidates]
    assert len(set(every_candidate)) == len(every_candidate) == config.canaries * config.candidates
    for query in data.queries:
        assert len(query.candidates) == config.candidates and query.target in query.candidates
        assert all(digits.match(c) for c in query.candidates)
        assert list(query.candidates) == sorted(query.candidates)  # position tells nothing


def test_planted_text_sits_inside_real_background_paragraphs(built):
    _, data = built
    background = set(background_paragraphs())
    queries = {q.id: q for q in data.queries}
    for document in data.documents:
        if document.source == "background":
            assert document.text in background
            continue
        query = queries[document.source.removeprefix("planted:")]
        sentence = f"{query.prompt} {query.target}."
        restored = document.text.replace(f"{sentence} ", "", 1).replace(f" {sentence}", "", 1)
        assert restored in background, document


def test_names_are_new_words_and_everything_fits_the_context(built):
    preset, data = built
    corpus_words = {w for p in background_paragraphs() for w in split_words(p)}
    names = {w for q in data.queries for w in split_words(q.prompt)[-3:-1]}
    assert len(names) == 2 * len(data.queries) and not names & corpus_words
    reserved = {w for text in data.reserved_words for w in split_words(text)}
    assert names | set("0123456789") == reserved
    context = preset.recipe.context
    assert max(len(split_words(d.text)) for d in data.documents) < context
    assert max(len(split_words(f"{q.prompt} {q.target}")) for q in data.queries) < context
    assert not set(data.heldout_texts) & {d.text for d in data.documents}
    assert len(data.documents) == preset.config.background_documents


def test_build_is_deterministic_in_the_seed():
    config = CanariesTask.scale("tiny").config
    first, again = (CanariesTask().build(config, seed=3) for _ in range(2))
    assert first.to_json() == again.to_json()
    other = CanariesTask().build(config, seed=4)
    assert first.fingerprint() != other.fingerprint()
    assert {q.target for q in first.queries} != {q.target for q in other.queries}


def test_copy_counts_double_from_min_to_max():
    assert CanariesConfig().copy_counts == (1, 2, 4, 8, 16)
    config = CanariesConfig(min_copies=3, max_copies=12, canaries_per_count=2)
    assert config.copy_counts == (3, 6, 12) and config.canaries == 6
    assert CanariesConfig(min_copies=4, max_copies=4).copy_counts == (4,)


def test_bad_configurations_name_the_value():
    with pytest.raises(ValueError, match="but got min_copies=2, max_copies=12"):
        CanariesConfig(min_copies=2, max_copies=12)
    with pytest.raises(ValueError, match=r"sum of the copy counts \[1, 2, 4, 8, 16\] \(248\)"):
        CanariesConfig(background_documents=200)
    with pytest.raises(ValueError, match="secret_digits=2 allows 100 secrets, fewer than the 800"):
        CanariesConfig(secret_digits=2)
    with pytest.raises(ParameterError, match=r"'min_copies' must lie in \[1, 256\], but got 0"):
        CanariesConfig(min_copies=0)


def test_exposure_on_closed_form_cases():
    assert exposure(1, candidates=20) == pytest.approx(math.log2(20))  # first: learned
    assert exposure(20, candidates=20) == 0.0  # last
    assert exposure(5, candidates=20) == pytest.approx(2.0)
    assert exposure(1, candidates=1024) == pytest.approx(10.0)
    assert exposure(2.5, candidates=10) == pytest.approx(2.0)  # a tie's mean rank
    for rank in (0, 21):
        with pytest.raises(
            ValueError, match=f"rank must lie in \\[1, candidates=20\\], but got {rank}"
        ):
            exposure(rank, candidates=20)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """A results folder whose cache holds the tiny canaries bundle, as the runner finds it."""
    results = tmp_path_factory.mktemp("canaries-results")
    bundle = prepare_bundle(
        TASKS.get("canaries")(), "tiny", seed=0, cache=Cache(results / "cache")
    )
    return results, bundle


def test_the_tiny_model_memorises_canaries_and_methods_run_on_them(tiny_results):
    results, bundle = tiny_results
    learned = sum(bundle.learned.values())
    assert learned >= len(bundle.data.queries) // 2
    most = max(len(q.relevant) for q in bundle.data.queries)
    assert all(bundle.learned[q.id] for q in bundle.data.queries if len(q.relevant) == most)
    assert bundle.learned_fraction_untrained < 0.5

    result = CliRunner().invoke(
        main,
        ["--results-dir", str(results), "run", "--method", "random,bm25,grad_dot",
         "--task", "canaries", "--scale", "tiny", "--no-lds", "--no-reliability"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{results.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("canaries").experiment_id])
    metrics = {r.data.tags["method"]: r.data.metrics for r in runs}
    assert sorted(metrics) == ["bm25", "grad_dot", "random"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    for m in metrics.values():
        assert m["queries_scored"] == learned and 0 <= m["mrr"] <= 1
    # the invented name in the prefix is in the canary's documents alone
    assert metrics["bm25"]["mrr"] > 0.9 > metrics["random"]["mrr_ci_high"]
    # the memorisation report, per repetition count, logged with every run
    report = TASKS.get("canaries")().model_metrics(bundle)
    for count in {len(q.relevant) for q in bundle.data.queries}:
        same = [q for q in bundle.data.queries if len(q.relevant) == count]
        assert report[f"memorised_k{count:02d}"] == pytest.approx(
            sum(bundle.learned[q.id] for q in same) / len(same)
        )
        assert metrics["bm25"][f"memorised_k{count:02d}"] == pytest.approx(
            report[f"memorised_k{count:02d}"]
        )
        bound = math.log2(len(same[0].candidates))
        assert 0 <= report[f"exposure_k{count:02d}"] <= bound
        if report[f"memorised_k{count:02d}"] == 1:  # every secret ranked first
            assert report[f"exposure_k{count:02d}"] == pytest.approx(bound)
        shown = report[f"memorised_k{count:02d}"]
        assert f"k={count} {shown:.0%}" in result.output  # the run summary shows it too

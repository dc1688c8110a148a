"""Task owners, its leave-one-owner-out ground truth and the owner-level metrics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.feature_extraction.text import TfidfVectorizer

import harness.owners
from harness.data import Document, Query, TaskData
from harness.owners import leave_one_owner_out, owner_metrics, owner_scores, top1_hits
from harness.partition import random_partition, topic_partition
from tasks.owners import OwnersConfig, OwnersTask


@pytest.fixture(scope="module")
def small_data() -> TaskData:
    task = OwnersTask()
    return task.build(task.scale("small").config, seed=3)


def test_every_document_has_an_owner_in_equal_shares_and_facts_stay_with_their_owner(
    small_data,
):
    config = OwnersTask.scale("small").config
    assert len(small_data.owners) == config.owners
    counts = {o: sum(d.owner == o for d in small_data.documents) for o in small_data.owners}
    assert set(counts.values()) == {config.documents_per_owner}
    owner_of = {d.id: d.owner for d in small_data.documents}
    assert len(small_data.queries) == config.owners * config.entities_per_owner * 2
    for query in small_data.queries:
        assert {owner_of[d] for d in query.relevant} == {query.owner}
        assert config.min_statements <= len(query.relevant) <= config.max_statements
    # every owner's topic contributes held-out text
    assert len(small_data.heldout_texts) == config.owners * config.heldout_per_owner


def test_owners_write_about_different_topics(small_data):
    # documents of one owner are more alike (TF-IDF cosine) than documents of two owners
    texts = [d.text for d in small_data.documents]
    vectors = TfidfVectorizer(stop_words="english").fit_transform(texts)
    similarity = (vectors @ vectors.T).toarray()
    owner = np.array([d.owner for d in small_data.documents])
    same = owner[:, None] == owner[None, :]
    np.fill_diagonal(same, False)
    different = owner[:, None] != owner[None, :]
    assert similarity[same].mean() > 1.5 * similarity[different].mean()


def test_bad_owner_settings_name_the_value():
    with pytest.raises(ValueError, match="documents_per_owner must be at least"):
        OwnersConfig(documents_per_owner=10, entities_per_owner=4, max_statements=4)
    with pytest.raises(
        ValueError, match="paragraphs are 3584, but the background corpus holds only"
    ):
        OwnersConfig(owners=32, documents_per_owner=100)


def test_task_data_refuses_partial_or_unknown_owners():
    documents = (Document("a", "x", "s", owner="o1"), Document("b", "y", "s"))
    query = Query("q", "p", "t", relevant=("a",), candidates=())
    with pytest.raises(ValueError, match="1 documents have no owner"):
        TaskData("t", documents, (query,), ("held",), ())
    owned = (Document("a", "x", "s", owner="o1"), Document("b", "y", "s", owner="o2"))
    stranger = Query("q", "p", "t", relevant=("a",), candidates=(), owner="o3")
    with pytest.raises(ValueError, match="names owner 'o3'"):
        TaskData("t", owned, (stranger,), ("held",), ())


def test_partitions_are_disjoint_and_cover_what_they_should():
    parts = random_partition(10, 3, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    texts = [f"cat dog pet {i}" for i in range(6)] + [f"disk file byte {i}" for i in range(6)]
    groups = topic_partition(texts, 2, seed=0)
    assert sorted(np.concatenate(groups).tolist()) == list(range(12))
    assert sorted(sorted(g.tolist()) for g in groups) == [list(range(6)), list(range(6, 12))]
    with pytest.raises(ValueError, match="cannot split 2 items into 3"):
        random_partition(2, 3, seed=0)


def test_top1_counts_a_tie_as_a_fair_draw():
    scores = np.array([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    np.testing.assert_allclose(top1_hits(scores, np.array([0, 1, 0])), [1.0, 0.5, 0.0])


def test_owner_metrics_sum_documents_per_owner_and_match_scipy(tiny_owners_bundle):
    bundle = tiny_owners_bundle
    queries = list(bundle.data.queries)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(len(queries), len(bundle.data.documents)))
    per_owner = owner_scores(scores, bundle)
    for column, owner in enumerate(bundle.data.owners):
        members = [i for i, d in enumerate(bundle.data.documents) if d.owner == owner]
        np.testing.assert_allclose(per_owner[:, column], scores[:, members].sum(axis=1))

    effects = leave_one_owner_out(bundle)
    metrics, per_query = owner_metrics(scores, queries, bundle, effects, seed=0)
    drops = effects.drops([q.id for q in queries])
    expected = [stats.spearmanr(per_owner[q], drops[q]).statistic for q in range(len(queries))]
    np.testing.assert_allclose(per_query["owner_spearman"], expected)
    true = [bundle.data.owners.index(q.owner) for q in queries]
    assert metrics["owner_top1"] == pytest.approx(np.mean(per_owner.argmax(axis=1) == true))
    assert metrics["owner_top1_ci_low"] <= metrics["owner_top1"] <= metrics["owner_top1_ci_high"]

    # scores that point at the query's own documents find the owner every time
    index = {d: i for i, d in enumerate(bundle.data.document_ids)}
    oracle = np.zeros_like(scores)
    for row, query in enumerate(queries):
        oracle[row, [index[d] for d in query.relevant]] = 1.0
    assert owner_metrics(oracle, queries, bundle, None, seed=0)[0]["owner_top1"] == 1.0


def test_removing_the_owner_of_a_fact_costs_it_more_than_removing_another(
    tiny_owners_bundle, monkeypatch
):
    bundle = tiny_owners_bundle
    effects = leave_one_owner_out(bundle)
    queries = [q for q in bundle.data.queries if bundle.learned[q.id]]
    drops = effects.drops([q.id for q in queries])
    own = np.array([bundle.data.owners.index(q.owner) for q in queries])
    own_drop = drops[np.arange(len(queries)), own]
    other_drop = np.array([np.delete(row, k).mean() for row, k in zip(drops, own, strict=True)])
    assert own_drop.mean() > other_drop.mean() + 1.0  # nats
    assert (own_drop > other_drop).mean() >= 0.75

    # the retrains are cached: a second call trains nothing
    def refuse(job):
        raise AssertionError("retrained a stored owner model")

    monkeypatch.setattr(harness.owners, "run_retrain", refuse)
    again = leave_one_owner_out(bundle)
    np.testing.assert_array_equal(again.without, effects.without)


def test_every_method_runs_on_owners_with_owner_metrics_and_the_experts_own_figures(
    results_dir,
):
    import polars as pl
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from harness.cli import main
    from harness.leaderboard import write_leaderboard
    from harness.method import METHODS

    result = CliRunner().invoke(
        main,
        ["--results-dir", str(results_dir), "run", "--method", "all", "--task", "owners",
         "--scale", "tiny", "--pool-models", "3", "--param", "datamodel.models=3",
         "--no-reliability"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Owner level" in result.output and "Unlearning check" in result.output
    assert "fact" not in result.output.split("Unlearning check", 1)[1]  # said of any task

    uri = f"sqlite:///{results_dir.resolve()}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("owners").experiment_id])
    metrics = {r.data.tags["method"]: r.data.metrics for r in runs}
    assert sorted(metrics) == METHODS.names()  # every registered method runs on owners
    assert {r.info.status for r in runs} == {"FINISHED"}
    for m in metrics.values():
        assert 0 <= m["owner_top1"] <= 1 and -1 <= m["owner_spearman"] <= 1
    experts = metrics["experts"]
    assert experts["heldout_loss_delta"] == pytest.approx(
        experts["own_heldout_loss"] - experts["heldout_loss"]
    )
    assert experts["unlearn_forgotten"] > 1 - experts["unlearn_kept_other"]
    assert "own_heldout_loss" not in metrics["bm25"]
    run = next(r for r in runs if r.data.tags["method"] == "experts")
    per_query = pl.read_csv(f"{client.download_artifacts(run.info.run_id, '')}/per_query.csv")
    assert per_query["owner_top1"].mean() == pytest.approx(experts["owner_top1"])

    table = write_leaderboard(uri, results_dir / "leaderboard.csv", tasks=["owners"])
    ranked = table.sort("rank")
    assert ranked["owner_top1"].to_list() == sorted(ranked["owner_top1"].to_list(), reverse=True)
    row = table.filter(pl.col("method") == "experts").row(0, named=True)
    assert row["heldout_loss_delta"] == pytest.approx(experts["heldout_loss_delta"])
    assert row["unlearn_forgotten"] == pytest.approx(experts["unlearn_forgotten"])

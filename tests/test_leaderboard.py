"""Leaderboard aggregation on hand-made run tables."""

from __future__ import annotations

import math

import polars as pl
import pytest
from scipy import stats

from harness.leaderboard import METRICS, build_leaderboard, terminal_tables


def _run(
    method,
    seed,
    mrr,
    *,
    params="{}",
    start=0,
    ci=(0.0, 1.0),
    scale="small",
    setup="s1",
    task="facts",
    variant="",
    queries="all",
    selection="",
    **metrics,
):
    row = {m: 0.5 for m in METRICS}
    row.update({"mrr": mrr, "mrr_ci_low": ci[0], "mrr_ci_high": ci[1], **metrics})
    return {
        "task": task,
        "scale": scale,
        "variant": variant,
        "setup": setup,
        "queries": queries,
        "method": method,
        "params": params,
        "selection": selection,
        "seed": seed,
        "run_id": f"{method}-{seed}-{start}",
        "start_time": start,
        **row,
    }


def test_configurations_are_separate_rows_and_seeds_are_pooled():
    runs = pl.DataFrame(
        [
            _run("tracin", 0, 0.6, ci=(0.5, 0.7)),
            _run("tracin", 0, 0.65, params='{"normalize": "True"}'),
            _run("tracin", 1, 0.3),
            _run("bm25", 0, 0.9, ci=(0.85, 0.95)),
        ]
    )
    board = build_leaderboard(runs)
    assert board.height == 3
    pooled = board.filter((pl.col("method") == "tracin") & (pl.col("params") == "{}")).row(
        0, named=True
    )
    assert pooled["n_runs"] == 2 and pooled["seeds"] == "0 1" and pooled["ci_basis"] == "seeds"
    assert pooled["mrr"] == pytest.approx(0.45)
    # Student t over the two seeds: 0.45 ± t(0.975, 1) × sd / sqrt(2)
    half_width = stats.t.ppf(0.975, 1) * (0.3 * math.sqrt(0.5)) / math.sqrt(2)
    assert pooled["mrr_ci_low"] == pytest.approx(0.45 - half_width)
    assert pooled["mrr_ci_high"] == pytest.approx(0.45 + half_width)
    single = board.filter(pl.col("method") == "bm25").row(0, named=True)
    assert (single["mrr_ci_low"], single["mrr_ci_high"], single["ci_basis"]) == (
        0.85,
        0.95,
        "queries",
    )
    assert board["rank"].to_list() == [1, 2, 3]
    assert board["method"].to_list() == ["bm25", "tracin", "tracin"]


def test_a_repeated_run_of_the_same_seed_counts_once_latest_first():
    runs = pl.DataFrame([_run("bm25", 0, 0.2, start=1), _run("bm25", 0, 0.4, start=2)])
    row = build_leaderboard(runs).row(0, named=True)
    assert row["n_runs"] == 1 and row["mrr"] == 0.4


def test_nan_never_ranks_first_and_scales_rank_separately():
    runs = pl.DataFrame(
        [
            _run("a", 0, float("nan")),
            _run("b", 0, 0.1),
            _run("c", 0, 0.9, scale="tiny"),
        ]
    )
    board = build_leaderboard(runs)
    ranks = dict(zip(board["method"], board["rank"], strict=True))
    assert ranks["b"] == 1 and ranks["c"] == 1 and ranks["a"] is None


def test_another_model_recipe_or_task_setting_is_another_row():
    runs = pl.DataFrame([_run("bm25", 0, 0.2, setup="s1"), _run("bm25", 1, 0.4, setup="s2")])
    board = build_leaderboard(runs)
    assert board.height == 2 and board["n_runs"].to_list() == [1, 1]


def test_only_memory_knobs_are_left_out_of_a_configuration():
    """Regression: layers (and EK-FAC's fit_documents) change scores, so they split rows."""
    from harness.leaderboard import _memory_only_params

    for name in ("grad_dot", "grad_cos", "tracin", "trak", "logra", "datainf", "ekfac"):
        assert _memory_only_params(name) == {"chunk_size"}, name
    assert _memory_only_params("bm25") == set()


def test_a_later_run_without_lds_keeps_the_earlier_lds_and_intervals_count_only_runs_with_it():
    with_lds = _run("trak", 0, 0.4, start=1)
    with_lds.update({"lds": 0.3, "lds_ci_low": 0.2, "lds_ci_high": 0.4, "lds_models": 30})
    without = _run("trak", 0, 0.41, start=2)  # the same seed again, LDS switched off
    without.update({"lds": None, "lds_ci_low": None, "lds_ci_high": None, "lds_models": None})
    other_seed = _run("trak", 1, 0.5, start=3)
    other_seed.update({"lds": None, "lds_ci_low": None, "lds_ci_high": None, "lds_models": None})
    board = build_leaderboard(pl.DataFrame([with_lds, without, other_seed]))
    row = board.row(0, named=True)
    assert row["n_runs"] == 2 and row["mrr"] == pytest.approx((0.41 + 0.5) / 2)
    # only seed 0 has LDS: its own bootstrap interval, not a t-interval over two seeds
    assert (row["lds"], row["lds_ci_low"], row["lds_ci_high"]) == (0.3, 0.2, 0.4)
    assert row["lds_models"] == 30


def test_heldout_rows_rank_apart_and_best_and_default_stay_separate():
    runs = pl.DataFrame(
        [
            _run("trak", 0, 0.5, queries="heldout", selection="best", params='{"damping": "1"}'),
            _run("trak", 0, 0.4, queries="heldout", selection="default"),
            _run("trak", 0, 0.45),  # the same default configuration, on every query
        ]
    )
    board = build_leaderboard(runs)
    assert board.height == 3
    heldout = board.filter(pl.col("queries") == "heldout")
    assert heldout["selection"].to_list() == ["best", "default"]
    assert heldout["rank"].to_list() == [1, 2]
    assert board.filter(pl.col("queries") == "all")["rank"].to_list() == [1]


def test_each_task_ranks_by_its_primary_metric():
    runs = pl.DataFrame(
        [
            _run("bm25", 0, 0.9, task="owners", owner_top1=0.2),
            _run("experts", 0, 0.1, task="owners", owner_top1=0.8),
            _run("nan", 0, 0.5, task="owners", owner_top1=float("nan")),
        ]
    )
    board = build_leaderboard(runs)
    assert board["method"].to_list() == ["experts", "bm25", "nan"]  # NaN last, never first
    assert board["rank"].to_list()[:2] == [1, 2]


def test_task_variants_are_ranked_apart_and_plotted_apart():
    from harness.plots import _labelled

    runs = pl.DataFrame(
        [
            _run("bm25", 0, 1.0),
            _run("bm25", 0, 0.8, variant="paraphrase=True", setup="s2"),
            _run("tracin", 0, 0.5, variant="paraphrase=True", setup="s2"),
        ]
    )
    table = build_leaderboard(runs)
    ranks = {(r["variant"], r["method"]): r["rank"] for r in table.iter_rows(named=True)}
    assert ranks == {
        ("", "bm25"): 1,
        ("paraphrase=True", "bm25"): 1,
        ("paraphrase=True", "tracin"): 2,
    }
    labels = _labelled(table)
    assert sorted(set(labels["task"].to_list())) == [
        "facts/small", "facts/small [paraphrase=True]"
    ]  # fmt: skip
    assert labels.filter(pl.col("configuration") == "bm25")["value"].sort().to_list() == [0.8, 1.0]


def test_the_terminal_view_is_one_narrow_table_per_ranked_group():
    tracin_defaults = '{"chunk_size": "96", "last_checkpoints": "0", "normalize": "False"}'
    runs = pl.DataFrame(
        [
            _run("tracin", 0, 0.61234, params=tracin_defaults, ci=(0.5, 0.7), lds=None),
            _run(
                "tracin", 0, 0.7, params='{"last_checkpoints": "2", "normalize": "True"}', lds=None
            ),
            _run(
                "bm25",
                0,
                0.9,
                task="owners",
                owner_top1=0.75,
                owner_top1_ci_low=0.6,
                owner_top1_ci_high=0.875,
            ),
            _run("bm25", 0, 0.8, variant="paraphrase=True", lds=None),
        ]
    )
    views = dict(terminal_tables(build_leaderboard(runs)))
    assert set(views) == {
        "facts · scale small · all queries · ranked by mrr",
        "facts · scale small · paraphrase=True · all queries · ranked by mrr",
        "owners · scale small · all queries · ranked by owner_top1",
    }
    facts = views["facts · scale small · all queries · ranked by mrr"]
    # only the parameters that differ from the method's defaults; none is "defaults"
    assert facts["params"].to_list() == ["last_checkpoints=2 normalize=True", "defaults"]
    assert facts["mrr"].to_list() == ["0.700", "0.612"]
    assert facts["95% interval"].to_list()[1] == "[0.500, 0.700]"
    assert "lds" not in facts.columns  # no row of the group has it
    owners = views["owners · scale small · all queries · ranked by owner_top1"]
    assert owners.columns[:6] == [
        "rank",
        "method",
        "params",
        "seed(s)",
        "owner_top1",
        "95% interval",
    ]
    assert owners.row(0, named=True)["95% interval"] == "[0.600, 0.875]"
    assert "mrr" in owners.columns and "lds" in owners.columns


def test_the_terminal_view_names_the_setup_only_where_two_groups_would_read_the_same():
    runs = pl.DataFrame(
        [_run("bm25", 0, 0.9, setup="aaaa1111"), _run("bm25", 0, 0.8, setup="bbbb2222")]
    )
    titles = [title for title, _ in terminal_tables(build_leaderboard(runs))]
    assert sorted(titles) == [
        "facts · scale small · setup aaaa1111 · all queries · ranked by mrr",
        "facts · scale small · setup bbbb2222 · all queries · ranked by mrr",
    ]
    alone = pl.DataFrame([_run("bm25", 0, 0.9, setup="aaaa1111")])
    assert [t for t, _ in terminal_tables(build_leaderboard(alone))] == [
        "facts · scale small · all queries · ranked by mrr"
    ]

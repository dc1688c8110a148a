"""The benchmark's arithmetic, and the command end to end on a small reference workload."""

from __future__ import annotations

import polars as pl
import pytest
from click.testing import CliRunner

from harness import bench
from harness.cli import main


def test_the_flop_bound_counts_every_token_and_the_product(tmp_path):
    bundle = bench.reference_bundle(10, 3, tmp_path)
    parameters = bundle.model().num_parameters()
    # 10 documents and 3 queries of 64 inputs each; a 3 × 10 product of gradients
    expected = (6 * parameters * 64 * 13 + 2 * 3 * 10 * parameters) / 1e11
    assert bench.flop_bound(bundle, bundle.learned_queries, 1e11) == pytest.approx(expected)
    assert len(bundle.tokenizer) == 256
    assert bundle.documents.inputs.shape == (10, 64)


def test_the_gemm_floor_does_the_bounds_linear_arithmetic_and_no_more(tmp_path):
    bundle = bench.reference_bundle(200, 3, tmp_path)
    queries = bundle.learned_queries
    work = bench.GemmWork.of(bundle, queries)
    model = bundle.model()
    linear = [model.head] + [m for b in model.blocks for m in (b.attention.qkv, b.attention.proj,
                                                               b.mlp[0], b.mlp[2])]  # fmt: skip
    weights = sum(m.weight.numel() for m in linear)
    assert sorted(work.layers) == sorted((m.in_features, m.out_features) for m in linear)
    assert work.document_chunks == [(96, 64), (96, 64), (8, 64)]
    assert work.query_chunks == [(3, 64)]
    expected = 6 * weights * 64 * 203 + 2 * 3 * 200 * weights
    assert work.flops() == expected
    # the linear layers hold most of the model, and never more arithmetic than the bound counts
    bound_flops = bench.flop_bound(bundle, queries, 1.0)
    assert 0.85 * bound_flops < work.flops() <= bound_flops


def test_bench_rejects_a_method_outside_the_gradient_family(tmp_path):
    result = CliRunner().invoke(
        main, ["--results-dir", str(tmp_path), "bench", "--method", "bm25"]
    )
    assert result.exit_code == 2
    assert "bm25 is a retrieval method" in result.output and "trak" in result.output


@pytest.mark.slow
def test_bench_measures_and_writes_every_figure(tmp_path):
    out = tmp_path / "bench.csv"
    result = CliRunner().invoke(
        main,
        ["--results-dir", str(tmp_path), "bench", "--workload", "reference",
         "--method", "grad_dot,trak", "--documents", "40", "--queries", "4",
         "--scale-up", "2", "--repeats", "1", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pl.read_csv(out)
    measures = set(table["measure"])
    assert {"gemm_floor", "featurize", "plain_dot", "vmap_baseline", "plain_loop"} <= measures
    assert "grad_dot" in measures
    assert "trak:projection_dim=512,last_checkpoints=1" in measures
    assert (table["seconds_cold"] > 0).all() and (table["peak_memory_mb"] > 100).all()
    base = table.filter(pl.col("workload") == "reference")
    assert (base["seconds_warm"] > 0).all()
    baseline = base.filter(pl.col("measure") == "vmap_baseline")
    assert (
        baseline["x_plain_baseline_warm"].item() == baseline["x_plain_baseline_cold"].item() == 1.0
    )
    scaled = table.filter(pl.col("workload") == "reference-x2")
    assert set(scaled["documents"]) == {80} and scaled["memory_growth"].is_not_null().all()

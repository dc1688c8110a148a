"""The command line through click's test runner: listings, bad input, and a full tiny run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.method import METHODS

# methods whose scores never read the model's weights (datamodel learns from retrains)
MODEL_FREE = {"bm25", "random", "datamodel", "tfidf", "ngram"}


def _invoke(results_dir, *args):
    return CliRunner().invoke(
        main, ["--results-dir", str(results_dir), *args], catch_exceptions=False
    )


def test_list_shows_methods_tasks_and_parameters(results_dir):
    result = _invoke(results_dir, "list")
    assert result.exit_code == 0
    for text in (
        "bm25",
        "grad_cos",
        "grad_dot",
        "random",
        "tracin",
        "facts",
        "k1=1.5",
        "--scale tiny",
    ):
        assert text in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "bm52", "--task", "facts"], "unknown method 'bm52'"),
        (
            ["--method", "bm25,nope", "--task", "facts"],
            "valid choices: bm25, datainf, datamodel, ekfac, experts, grad_cos",
        ),
        (["--method", "bm25", "--task", "fcts"], "Did you mean 'facts'"),
        (
            ["--method", "bm25", "--task", "facts", "--scale", "huge"],
            "unknown scale 'huge' for task 'facts'; valid choices: medium, small, tiny",
        ),
        (
            ["--method", "bm25", "--task", "facts", "--param", "k1=high"],
            r"'k1' must be of type float in \[0.0, 5.0\], but got 'high'",
        ),
        (
            ["--method", "bm25", "--task", "facts", "--param", "b=2"],
            r"'b' must lie in \[0.0, 1.0\]",
        ),
        (
            ["--method", "trak,ekfac", "--task", "facts", "--param", "damping=0"],
            r"'damping' must lie in \[1e-09, 1000.0\], but got 0.0",
        ),
        (
            ["--method", "grad_dot", "--task", "facts", "--param", "layers=nothing.*"],
            r"layers='nothing.\*' matches no parameter.*blocks.0.attention.qkv",
        ),
        (
            ["--method", "logra", "--task", "facts", "--param", "layers=norm_final.*"],
            r"matches no linear layer; the model's linear layers are blocks.0.attention.qkv",
        ),
        (
            ["--method", "ekfac", "--task", "facts", "--param", "layers=head.*"],
            r"layer 'head' shares its weight with \['token_embedding.weight'\]",
        ),
        (
            ["--method", "tracin,trak", "--task", "facts", "--param", "last_checkpoints=10"],
            r"last_checkpoints=10, but this task's recipe keeps 4 checkpoints",
        ),
        (
            [
                "--method",
                "grad_dot",
                "--task",
                "facts",
                "--param",
                "projection=kronecker",
                "--param",
                "projection_dim=512",
            ],
            r"projection_dim=512 is a Kronecker rank per side .* the largest is 256",
        ),
        (
            [
                "--method",
                "grad_dot",
                "--task",
                "facts",
                "--param",
                "projection=gaussian",
                "--param",
                "layers=norm_final.*",
                "--param",
                "projection_dim=512",
            ],
            r"projection_dim=512 exceeds the 256 gradient entries of layers='norm_final.\*'",
        ),
        (
            ["--method", "trak", "--task", "facts", "--param", "projection=kronecker"],
            r"'projection' must be one of \['gaussian', 'rademacher'\]",
        ),
        (
            ["--method", "bm25", "--task", "facts", "--pool-models", "2"],
            "--pool-models must be at least 3",
        ),
        (
            ["--method", "bm25", "--task", "facts", "--pool-fraction", "1.5"],
            "--pool-fraction must lie strictly between 0 and 1, but got 1.5",
        ),
        (["--method", "bm25", "--task", "facts", "--workers", "0"], "0 is not in the range"),
        (
            ["--method", "bm25", "--task", "facts", "--removal-queries", "0"],
            "--removal-queries must be at least 1",
        ),
        (
            ["--method", "bm25", "--task", "facts", "--param", "depth=3"],
            "unknown parameter 'depth'",
        ),
        (
            ["--method", "random", "--task", "facts", "--param", "k1=1"],
            "random takes no parameters",
        ),
        (["--method", "bm25", "--task", "facts", "--param", "k1"], "expected KEY=VALUE"),
        (
            [
                "--method",
                "bm25",
                "--task",
                "facts",
                "--task-param",
                "entities=8",
                "--task-param",
                "entities=9",
            ],
            "entities is given twice",
        ),
        (
            ["--method", "bm25", "--task", "facts", "--task-param", "paraphrase=maybe"],
            "parameter 'paraphrase' must be a bool .* but got 'maybe'",
        ),
        (
            ["--method", "bm25", "--task", "facts", "--task-param", "model.stepz=10"],
            "unknown model recipe parameter 'stepz'",
        ),
        (
            ["--method", "bm25", "--task", "facts", "--param", "tracin.normalize=1"],
            (
                "'tracin.normalize' is for method 'tracin', which is not selected; "
                "selected methods: bm25"
            ),
        ),
    ],
)
def test_bad_input_exits_2_with_a_clear_message_before_any_work(results_dir, args, message):
    result = CliRunner().invoke(main, ["--results-dir", str(results_dir), "run", *args])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert not (results_dir / "cache").exists()  # nothing was built or trained


def test_run_all_methods_then_leaderboard(results_dir, caplog):
    result = _invoke(results_dir, "run", "--method", "all", "--task", "facts", "--scale", "tiny",
                     "--pool-models", "3", "--param", "datamodel.models=3")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "MRR [95% CI]" in result.output and "Browse:  harness ui --results-dir" in result.output

    client = MlflowClient(tracking_uri=f"sqlite:///{results_dir.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("facts")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["method"] for r in runs) == sorted(METHODS.names())
    assert {"trak", "ekfac", "logra", "datainf", "grad_dot", "bm25"} <= set(METHODS.names())
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["task"] == "facts" and run.data.params["scale"] == "tiny"
        assert run.data.params["model.depth"] == "1"
        assert {"family", "code_version", "data_hash"} <= run.data.tags.keys()
        metrics = run.data.metrics
        for name in ("mrr", "recall_at_1", "recall_at_10", "recall_at_50", "auprc"):
            assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
        assert metrics["fit_seconds"] >= 0 and metrics["score_seconds"] >= 0
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"scores.npy", "per_query.csv", "method.json", "learned.json"}
        folder = client.download_artifacts(run.info.run_id, "")
        scores = np.load(f"{folder}/scores.npy", allow_pickle=False)
        described = json.loads(Path(folder, "method.json").read_text())
        rows, columns = described["rows"], described["columns"]
        assert scores.shape == (metrics["queries_scored"], 60) == (len(rows), len(columns))
        assert columns[0] == "doc-00000" and len(set(columns)) == 60
        learned = json.loads(Path(folder, "learned.json").read_text())
        assert len(learned) == 16 and set(rows) == {q for q, ok in learned.items() if ok}
        per_query = pl.read_csv(f"{folder}/per_query.csv")
        assert per_query["reciprocal_rank"].mean() == pytest.approx(metrics["mrr"])
        # counterfactual and reliability columns, on every method
        assert metrics["lds_models"] == 3 and per_query["lds"].mean() == pytest.approx(
            metrics["lds"]
        )
        assert metrics["lds_ci_low"] <= metrics["lds"] <= metrics["lds_ci_high"]
        assert metrics["failed_queries"] == 0
        for name in ("seed_stability", "model_seed_stability", "randomization_correlation"):
            assert -1.0 <= metrics[name] <= 1.0
        independent = run.data.tags["model_independent"] == "true"
        assert independent == (run.data.tags["method"] in MODEL_FREE)

    # a second run of one method reuses the cached model and is its own MLflow run
    caplog.clear()
    with caplog.at_level("INFO"):
        again = _invoke(
            results_dir, "run", "--method", "bm25", "--task", "facts", "--scale", "tiny",
            "--no-reliability", "--pool-models", "3",
        )  # fmt: skip
    assert again.exit_code == 0
    assert "found existing model" in caplog.text and "training a" not in caplog.text
    assert len(client.search_runs([experiment.experiment_id])) == len(METHODS.names()) + 1
    # a memory-only parameter makes another run of the same configuration, not a new row
    chunked = _invoke(results_dir, "run", "--method", "grad_dot", "--task", "facts",
                      "--scale", "tiny", "--param", "chunk_size=4", "--no-reliability",
                      "--pool-models", "3")  # fmt: skip
    assert chunked.exit_code == 0, chunked.output

    out = results_dir / "board.csv"
    board = _invoke(results_dir, "leaderboard", "--out", str(out))
    assert board.exit_code == 0, board.output
    assert "facts · scale tiny · all queries · ranked by mrr" in board.output
    assert "{" not in board.output  # parameters as key=value, not JSON cells
    table = pl.read_csv(out)
    assert table.height == len(METHODS.names()) and set(table["method"]) == set(METHODS.names())
    assert table.filter(pl.col("method") == "bm25")["n_runs"].item() == 1  # same seed: once
    assert table["rank"].min() == 1
    assert table.sort("rank")["mrr"].is_sorted(descending=True)


def test_leaderboard_of_an_empty_store_says_what_to_do(results_dir):
    result = _invoke(results_dir, "leaderboard")
    assert result.exit_code == 0
    assert "No finished runs yet" in result.output


def test_an_unusable_tracking_store_is_refused_before_training(results_dir):
    result = CliRunner().invoke(
        main,
        [
            "--results-dir",
            str(results_dir),
            "--tracking-uri",
            "nosuchscheme://x",
            "run",
            "--method",
            "bm25",
            "--task",
            "facts",
            "--scale",
            "tiny",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "cannot use the MLflow tracking store 'nosuchscheme://x'" in result.output
    assert not (results_dir / "cache").exists()


def test_the_tracking_uri_can_come_from_the_environment(results_dir, tmp_path, monkeypatch):
    store = tmp_path / "elsewhere" / "store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    result = CliRunner().invoke(
        main,
        [
            "--results-dir",
            str(results_dir),
            "run",
            "--method",
            "random",
            "--task",
            "facts",
            "--scale",
            "tiny",
            "--no-lds",
            "--no-reliability",
        ],
    )
    assert result.exit_code == 0, result.output
    assert store.is_file() and not (results_dir / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    assert len(client.search_runs([client.get_experiment_by_name("facts").experiment_id])) == 1


def test_store_options_are_accepted_after_the_subcommand_too(tmp_path):
    results = tmp_path / "after"
    result = CliRunner().invoke(
        main, ["run", "--method", "random", "--task", "facts", "--scale", "tiny",
               "--results-dir", str(results), "--no-lds", "--no-reliability"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (results / "mlflow.db").is_file()
    board = CliRunner().invoke(main, ["leaderboard", "--results-dir", str(results)])
    assert board.exit_code == 0 and (results / "leaderboard.csv").is_file()


def test_an_unwritable_leaderboard_path_is_a_usage_error(results_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(
        main, ["--results-dir", str(results_dir), "leaderboard", "--out", str(blocker / "x.csv")]
    )
    assert result.exit_code == 2
    assert "is not a writable folder" in result.output


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_the_console_script_turns_a_signal_into_an_unwinding_exit(monkeypatch, name):
    import os
    import signal

    import harness.cli

    signum = getattr(signal, name)

    def terminated_main():
        os.kill(os.getpid(), signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr(harness.cli, "main", terminated_main)
    try:
        with pytest.raises(SystemExit) as exit_info:
            harness.cli.entry_point()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert exit_info.value.code == 128 + signum  # 143 and 130, as a shell reports them
    assert str(exit_info.value) == f"terminated by {name}"  # what a failed run's tag says


def test_a_pool_fraction_that_keeps_no_document_is_refused_before_training(results_dir):
    result = CliRunner().invoke(
        main,
        ["--results-dir", str(results_dir), "run", "--method", "bm25", "--task", "facts",
         "--scale", "tiny", "--pool-fraction", "0.001"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--pool-fraction 0.001 of the task's 60 documents keeps 0" in result.output
    assert not (results_dir / "cache" / "models").exists()  # nothing was trained

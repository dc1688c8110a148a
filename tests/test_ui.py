"""`harness ui`: the MLflow UI served on 127.0.0.1, loaded in a headless browser."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.tracking import Tracker
from harness.ui import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _wait_until_up(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited early with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def _port_open(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian package `chromium`)")
def test_the_mlflow_ui_shows_the_harness_experiment_and_run_in_a_browser(tmp_path):
    results = tmp_path / "results"
    tracker = Tracker(f"sqlite:///{results.resolve()}/mlflow.db", artifact_root=results)
    with tracker.run(task="facts", name="bm25-facts-tiny-seed0", tags={"method": "bm25"}) as run:
        run.log_metrics({"mrr": 0.5})
    experiment = tracker.experiment_id("facts")

    port = free_port()
    harness = Path(sys.executable).with_name("harness")
    server = subprocess.Popen(
        [str(harness), "--results-dir", str(results), "ui", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert f"at http://127.0.0.1:{port}" in server.stdout.readline()
        _wait_until_up(f"http://127.0.0.1:{port}/health", server)
        page = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--virtual-time-budget=60000", "--dump-dom",
             f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs"],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert "facts" in page.stdout
        assert "bm25-facts-tiny-seed0" in page.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    # stopping the harness stopped the server it started
    deadline = time.monotonic() + 30
    while _port_open(port) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _port_open(port)


def test_the_optuna_dashboard_needs_a_study_first(tmp_path):
    result = CliRunner().invoke(main, ["--results-dir", str(tmp_path), "ui", "--optuna"])
    assert result.exit_code == 2
    assert "no Optuna storage at sqlite:///" in result.output and "harness sweep" in result.output


def test_the_ui_binds_to_loopback_only():
    from harness.ui import mlflow_command, optuna_command

    for command in (mlflow_command("sqlite:///x.db", 5001), optuna_command("sqlite:///x", 5002)):
        assert command[command.index("--host") + 1] == "127.0.0.1"
    journal = optuna_command("journal:///tmp/optuna.journal", 5003)
    assert journal[1] == "/tmp/optuna.journal"
    assert os.path.basename(journal[0]) == "optuna-dashboard"

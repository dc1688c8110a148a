"""MLflow bookkeeping: where runs go, and one run's life from start to FINISHED or FAILED.

The client API is used rather than MLflow's global "active run", so the
harness never leaves tracking state behind in the caller's process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

import harness
from harness.errors import HarnessError

_logger = logging.getLogger(__name__)

TASK_TAG = "harness.task"
ROLE_TAG = "harness.role"  # "sweep" on a study's parent run, "trial" on its trials
VARIANT_TAG = "task_variant"  # the task's setting overrides (key=value,...); empty for presets
INPUTS_TAG = "task_inputs"  # a hash of a task's user files and pretrained model; empty if none
# a hash of the task's settings and model recipe, files by their contents: rows of a leaderboard
SETUP_TAG = "task_setup"
MAX_PARAM_LENGTH = 6000


def tracking_uri(results_dir: Path, override: str | None = None) -> str:
    """``override``, else ``MLFLOW_TRACKING_URI``, else a SQLite store in the results folder."""
    if override:
        return override
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{Path(results_dir).resolve()}/mlflow.db"
    )


def code_version() -> str:
    """The package version, with the git commit when running from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(harness.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return harness.__version__
    return f"{harness.__version__}+{commit}"


class TrackingStoreError(HarnessError, ConnectionError):
    """The MLflow tracking store cannot be opened or written."""


def open_client(uri: str) -> MlflowClient:
    """An MLflow client on ``uri``, checked by a first query.

    A new local SQLite store is created in a temporary file and renamed into
    place once MLflow has built its tables, so an interrupt during that first
    set-up cannot leave a half-built store behind.
    """
    database = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    try:
        if database is not None and not database.exists():
            _create_sqlite_store(database)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # touch the store: fail here, not later
    except Exception as error:
        advice = (
            f"if {database} is a store left half-built by an interrupted run, delete it"
            if database is not None
            else "pass --tracking-uri (or set MLFLOW_TRACKING_URI) to a reachable store"
        )
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TrackingStoreError(
            f"cannot use the MLflow tracking store {uri!r} ({type(error).__name__}: "
            f"{first_line}); {advice}"
        ) from error
    return client


def _create_sqlite_store(database: Path) -> None:
    database.parent.mkdir(parents=True, exist_ok=True)
    staging = database.with_name(f".{database.name}.{os.getpid()}.building")
    staging.unlink(missing_ok=True)
    try:
        MlflowClient(tracking_uri=f"sqlite:///{staging}").search_experiments(max_results=1)
        if not database.exists():  # another process may have finished first
            os.replace(staging, database)
    finally:
        staging.unlink(missing_ok=True)


class Tracker:
    """Creates one experiment per task and one MLflow run per method run."""

    def __init__(self, uri: str, *, artifact_root: Path | None) -> None:
        self.uri = uri
        self.client = open_client(uri)
        self.artifact_root = artifact_root  # None lets the tracking server decide

    def experiment_id(self, task: str) -> str:
        experiment = self.client.get_experiment_by_name(task)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.artifact_root is not None:
            location = (self.artifact_root / task).resolve().as_uri()
        return self.client.create_experiment(
            task, artifact_location=location, tags={TASK_TAG: task}
        )

    @contextlib.contextmanager
    def run(self, *, task: str, name: str, tags: dict[str, str]) -> Iterator[ActiveRun]:
        """A run that ends FINISHED, or FAILED with the error recorded if the body raises.

        The run is terminated whatever happens, interrupts included, so none is
        left RUNNING; the error message becomes the tag ``error`` and the
        traceback the artifact ``error.txt``.
        """
        run = self.client.create_run(self.experiment_id(task), run_name=name, tags=tags)
        run_id, status = run.info.run_id, "FAILED"
        try:
            yield ActiveRun(self.client, run_id)
            status = "FINISHED"
        except BaseException as error:
            self._record_error(run_id, error)
            raise
        finally:
            self.client.set_terminated(run_id, status=status)

    def _record_error(self, run_id: str, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}"
        _logger.error("run %s failed: %s", run_id, message)
        try:
            self.client.set_tag(run_id, "error", message[:5000])
            self.client.log_text(run_id, traceback.format_exc(), "error.txt")
        except Exception as logging_error:  # the run is still marked FAILED
            _logger.warning("could not record the error of run %s: %s", run_id, logging_error)


class ActiveRun:
    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_params(self, params: dict[str, Any]) -> None:
        batch = [Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in params.items()]
        self.client.log_batch(self.run_id, params=batch)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

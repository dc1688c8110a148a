"""Local web UIs on the results: MLflow's, or the Optuna dashboard on the study storage.

Both are bound to 127.0.0.1 on a free port, never to an outside interface: the
stores hold unpublished results and the servers have no authentication.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """A port on the loopback interface that nothing listens on now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _executable(name: str) -> str:
    beside = Path(sys.executable).with_name(name)  # the same environment as the harness
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} is not installed in this environment")
    return found


def mlflow_command(tracking_uri: str, port: int) -> list[str]:
    return [
        _executable("mlflow"), "ui", "--backend-store-uri", tracking_uri,
        "--host", HOST, "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def optuna_command(storage: str, port: int) -> list[str]:
    # the dashboard takes a journal file as a path, and database storages as URLs
    target = storage.removeprefix("journal://") if storage.startswith("journal://") else storage
    return [_executable("optuna-dashboard"), target, "--host", HOST, "--port", str(port)]


def serve(command: list[str]) -> int:
    """Run a server until it exits; stop it, with every process it started, when we stop.

    The server runs in its own process group (MLflow's UI starts workers of its
    own), so an interrupt or a termination of the harness stops all of them.
    """
    process = subprocess.Popen(command, start_new_session=True)
    try:
        return process.wait()
    except BaseException:  # Ctrl-C, SIGTERM (raised as SystemExit by the CLI), errors
        stop_group(process)
        raise


def stop_group(process: subprocess.Popen, *, grace: float = 10.0) -> None:
    """SIGTERM the process's group, then SIGKILL whatever is left after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)

"""benchmarks/method_agreement.py: rank agreement of stored score matrices."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from harness.cli import main

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "method_agreement.py"


def _module():
    spec = importlib.util.spec_from_file_location("method_agreement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agreement_on_closed_form_cases():
    agreement = _module().agreement
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 30))
    assert agreement(scores, 3 * scores + 1) == pytest.approx((1.0, 1.0))  # same ranking
    rho, overlap = agreement(scores, -scores)
    assert rho == pytest.approx(-1.0) and overlap == 0.0  # top 10 of 30 against bottom 10
    other = rng.normal(size=(4, 30))
    expected = np.mean(
        [stats.spearmanr(a, b).statistic for a, b in zip(scores, other, strict=True)]
    )
    assert agreement(scores, other)[0] == pytest.approx(expected)


def test_the_script_reads_two_runs_and_refuses_a_missing_one(tmp_path):
    results = tmp_path / "results"
    run = CliRunner().invoke(
        main,
        ["--results-dir", str(results), "run", "--method", "bm25,tfidf,random", "--task",
         "facts", "--scale", "tiny", "--no-lds", "--no-reliability"],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    command = [sys.executable, str(SCRIPT), "--results-dir", str(results), "--task", "facts"]
    out = subprocess.run(
        [*command, "--scale", "tiny", "--methods", "bm25,tfidf,random"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
    assert set(lines) == {"bm25", "tfidf"}  # "bm25 / tfidf", "bm25 / random", ...
    pairs = {" ".join(parts[:3]): float(parts[3]) for parts in lines.values()}
    assert len(out.stdout.splitlines()) == 2 + 3
    assert -1 <= min(pairs.values()) <= max(pairs.values()) <= 1
    missing = subprocess.run(
        [*command, "--scale", "tiny", "--methods", "bm25,trak"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no finished run of 'trak'" in missing.stderr

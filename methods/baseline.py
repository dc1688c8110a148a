"""The floor every method must clear: scores drawn at random."""

from __future__ import annotations

import numpy as np

from harness.bundle import Bundle
from harness.data import Query
from harness.method import Method


class RandomScores(Method, name="random", family="baseline"):
    """Independent standard-normal scores, seeded by the run's seed."""

    description = "random scores: the floor of every metric"

    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return rng.standard_normal((len(queries), len(bundle.data.documents)))

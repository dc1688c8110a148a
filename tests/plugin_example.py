"""A method as a third-party package would ship it: found only through its entry point."""

from __future__ import annotations

import numpy as np

from harness.method import Method


class DocumentLength(Method):
    """Scores every document by its length; registered by the test's entry point only."""

    name = "document_length"
    family = "baseline"

    def score(self, bundle, queries):
        lengths = np.array([len(d.text) for d in bundle.data.documents], dtype=float)
        return np.tile(lengths, (len(queries), 1))

"""Which of a task's queries a run scores: all, or one side of a seeded tuning/held-out split.

A sweep tunes on the ``tuning`` queries and reports its chosen configuration on
the ``heldout`` ones, so the figure in the leaderboard was never optimised on.
The split is drawn over every query of the task (learned or not) from the
seed alone, so it is the same for every method and model of a task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from harness.data import Query
from harness.errors import UnknownNameError

QUERY_SETS = ("all", "tuning", "heldout")
TUNING_FRACTION = 0.5


def select_queries(queries: Sequence[Query], part: str, *, seed: int) -> list[Query]:
    """The queries of ``part``, in their original order."""
    if part not in QUERY_SETS:
        raise UnknownNameError("query set", part, QUERY_SETS)
    if part == "all":
        return list(queries)
    ids = sorted(q.id for q in queries)
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(ids))
    tuning = {ids[i] for i in order[: math.ceil(TUNING_FRACTION * len(ids))]}
    return [q for q in queries if (q.id in tuning) == (part == "tuning")]

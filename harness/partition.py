"""Splitting documents into groups: at random, or by topic into groups of equal size.

Tasks use it to give data owners distinct topics; the partitioned-experts method
to shard a corpus that has no owners.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import TfidfVectorizer


def random_partition(count: int, groups: int, *, seed: int) -> list[np.ndarray]:
    """``range(count)`` shuffled by ``seed``, cut into ``groups`` near-equal parts."""
    _check_groups(count, groups)
    order = np.random.default_rng(seed).permutation(count)
    return [np.sort(part) for part in np.array_split(order, groups)]


def topic_partition(
    texts: list[str], groups: int, *, seed: int, size: int | None = None
) -> list[np.ndarray]:
    """Groups of texts on one topic each, of equal size (``size``, or all texts shared out).

    Topics are k-means clusters of TF-IDF vectors. Plain k-means makes clusters
    of very unequal size, so each group then takes, in turn, the text closest to
    its cluster centre among those left, until it holds ``size`` texts. Each
    group's indices are in the order it took them: nearest its topic first.
    """
    _check_groups(len(texts), groups)
    if size is None:
        size = -(-len(texts) // groups)  # the last groups may hold one fewer
    elif groups * size > len(texts):
        raise ValueError(f"{groups} groups of {size} need {groups * size} texts, got {len(texts)}")
    vectors = TfidfVectorizer(stop_words="english", sublinear_tf=True, min_df=2).fit_transform(
        texts
    )
    clusters = KMeans(n_clusters=groups, random_state=seed, n_init=4).fit(vectors)
    centres = clusters.cluster_centers_
    centres /= np.linalg.norm(centres, axis=1, keepdims=True).clip(min=1e-12)
    similarity = np.asarray(vectors @ centres.T)  # rows are unit vectors: cosine similarity
    taken = np.zeros(len(texts), dtype=bool)
    members: list[list[int]] = [[] for _ in range(groups)]
    while True:
        progressed = False
        for group in range(groups):
            if len(members[group]) == size or taken.all():
                continue
            choice = int(np.argmax(np.where(taken, -np.inf, similarity[:, group])))
            taken[choice] = True
            members[group].append(choice)
            progressed = True
        if not progressed:
            return [np.array(m, dtype=np.int64) for m in members]


def _check_groups(count: int, groups: int) -> None:
    if groups < 1:
        raise ValueError(f"the number of groups must be positive, but got {groups}")
    if groups > count:
        raise ValueError(f"cannot split {count} items into {groups} non-empty groups")

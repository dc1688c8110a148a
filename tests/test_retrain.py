"""Subset-retrain pools: deterministic, cached model by model, resumable, shared."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from harness.cache import Cache
from harness.executor import InlineExecutor, ProcessExecutor
from harness.retrain import build_pool, retrain_seed, subset_recipe
from harness.training import TrainRecipe


class CountingExecutor(InlineExecutor):
    """Runs jobs in this process, counting them; optionally interrupted after ``stop_after``."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.trained: list[int] = []
        self.stop_after = stop_after

    def run(self, function, jobs):
        for job in jobs:
            if self.stop_after is not None and len(self.trained) == self.stop_after:
                raise KeyboardInterrupt  # as if the build were killed here
            self.trained.append(job.index)
            yield job, function(job)


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    # a fresh cache per test, so that every test starts with no pool
    return dataclasses.replace(tiny_bundle, cache=Cache(tmp_path / "cache"))


def test_subset_recipe_keeps_the_epochs():
    recipe = TrainRecipe(steps=2000, warmup_steps=50, checkpoints=4)
    half = subset_recipe(recipe, 0.5)
    assert (half.steps, half.warmup_steps, half.checkpoints) == (1000, 25, 1)
    assert half.learning_rate == recipe.learning_rate and half.batch_size == recipe.batch_size


def test_an_interrupted_pool_resumes_without_retraining_finished_models(bundle):
    interrupted = CountingExecutor(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        build_pool(bundle, "lds", models=3, fraction=0.5, executor=interrupted)
    assert interrupted.trained == [0, 1]

    resumed = CountingExecutor()
    pool = build_pool(bundle, "lds", models=3, fraction=0.5, executor=resumed)
    assert resumed.trained == [2]  # only the missing model

    # what was resumed equals a build that was never interrupted (training is seeded)
    other = dataclasses.replace(bundle, cache=Cache(bundle.cache.root.parent / "other"))
    fresh = build_pool(other, "lds", models=3, fraction=0.5, executor=InlineExecutor())
    np.testing.assert_array_equal(pool.masks, fresh.masks)
    np.testing.assert_allclose(pool.logprobs, fresh.logprobs, rtol=1e-6)

    n = len(bundle.data.documents)
    assert pool.masks.shape == (3, n) and (pool.masks.sum(axis=1) == n // 2).all()
    assert len({row.tobytes() for row in pool.masks}) == 3  # each model its own subset
    assert pool.seeds.tolist() == [retrain_seed("lds", bundle.seed, i) for i in range(3)]
    assert pool.logprobs.shape == (3, len(bundle.data.queries))
    assert (pool.logprobs < 0).all() and np.isfinite(pool.heldout_losses).all()


def test_a_larger_pool_reuses_the_smaller_ones_models(bundle, caplog):
    build_pool(bundle, "lds", models=2, fraction=0.5, executor=InlineExecutor())
    grow = CountingExecutor()
    pool = build_pool(bundle, "lds", models=4, fraction=0.5, executor=grow)
    assert grow.trained == [2, 3] and len(pool) == 4
    again = CountingExecutor()
    with caplog.at_level("INFO"):
        build_pool(bundle, "lds", models=4, fraction=0.5, executor=again)
    assert again.trained == [] and "all 4 models stored" in caplog.text


def test_a_datamodel_pool_is_another_pool_with_other_seeds(bundle):
    lds = build_pool(bundle, "lds", models=2, fraction=0.5, executor=InlineExecutor())
    datamodel = build_pool(bundle, "datamodel", models=2, fraction=0.5, executor=InlineExecutor())
    assert lds.key != datamodel.key
    assert not set(lds.seeds.tolist()) & set(datamodel.seeds.tolist())


def test_a_process_pool_trains_the_same_models(bundle):
    inline = build_pool(bundle, "lds", models=2, fraction=0.5, executor=InlineExecutor())
    other = dataclasses.replace(bundle, cache=Cache(bundle.cache.root.parent / "processes"))
    spawned = build_pool(other, "lds", models=2, fraction=0.5, executor=ProcessExecutor(2))
    np.testing.assert_array_equal(inline.masks, spawned.masks)
    # one thread per worker instead of two: the same training up to float rounding
    np.testing.assert_allclose(inline.logprobs, spawned.logprobs, rtol=1e-2)


@pytest.mark.parametrize(
    ("models", "fraction", "message"),
    [
        (1, 0.5, "at least 2 models"),
        (3, 1.0, "strictly between 0 and 1"),
        (3, 0.001, "keeps 0"),
    ],
)
def test_bad_pool_settings_are_refused(bundle, models, fraction, message):
    with pytest.raises(ValueError, match=message):
        build_pool(bundle, "lds", models=models, fraction=fraction, executor=CountingExecutor())


def _square_unless_three(x: int) -> int:
    if x == 3:
        raise ArithmeticError("three is not allowed")
    return x * x


def test_a_failed_job_keeps_every_finished_result_then_raises():
    executor = ProcessExecutor(2)
    results = {}
    with pytest.raises(ArithmeticError, match="three is not allowed"):
        for job, result in executor.run(_square_unless_three, [1, 2, 3]):
            results[job] = result
    assert results == {1: 1, 2: 4}  # both finished jobs reached the caller before the error

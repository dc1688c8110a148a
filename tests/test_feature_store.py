"""The train-side feature store: computed once, reused, never half-written."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from harness.cache import Cache
from harness.features import FeatureSpec, Featurizer, TrainFeatures, train_features
from harness.method import METHODS

SPEC = FeatureSpec(projection="rademacher", dim=32, seed=4)


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    return dataclasses.replace(tiny_bundle, cache=Cache(tmp_path / "cache"))


def _stored_entries(bundle):
    folder = bundle.cache.root / "features"
    return (
        sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        if folder.exists()
        else []
    )


def test_features_are_stored_once_and_reused(bundle, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="harness.features")
    _, first = train_features(bundle, SPEC)
    assert "stored train features" in caplog.text
    assert len(_stored_entries(bundle)) == 1
    computed = np.array(first.stored)

    # the second time nothing may be computed
    def refuse(*args, **kwargs):
        raise AssertionError("train features were computed again")

    monkeypatch.setattr(Featurizer, "chunks", refuse)
    monkeypatch.setattr(Featurizer, "chunks_by_length", refuse)
    caplog.clear()
    _, second = train_features(bundle, SPEC)
    assert "reusing stored train features" in caplog.text
    np.testing.assert_array_equal(np.array(second.stored), computed)
    np.testing.assert_array_equal(second.losses, first.losses)


def test_stored_features_equal_freshly_computed_ones(bundle):
    featurizer, features = train_features(bundle, SPEC, chunk_size=7)
    in_memory = TrainFeatures(featurizer, bundle.documents, store=None, key_parts={})
    np.testing.assert_allclose(np.array(features.stored), in_memory.stored, rtol=1e-5, atol=1e-6)
    # and each row is the document's own projected gradient, whatever the chunking
    (alone,), loss = featurizer.features(bundle.documents[5:6])
    np.testing.assert_allclose(features.stored[5], alone[0].numpy(), rtol=1e-4, atol=1e-6)
    assert features.losses[5] == pytest.approx(float(loss[0]), rel=1e-5)


def test_another_spec_or_checkpoint_gets_its_own_entry(bundle):
    train_features(bundle, SPEC)
    train_features(bundle, dataclasses.replace(SPEC, seed=5))
    train_features(bundle, SPEC, checkpoint=0)
    assert len(_stored_entries(bundle)) == 3


def test_methods_with_the_same_projection_share_one_entry(bundle, caplog):
    caplog.set_level(logging.INFO, logger="harness.features")
    queries = bundle.learned_queries[:2]
    for name in ("logra", "datainf"):  # LoGra's rank-16 projection for both
        method_class = METHODS.get(name)
        params = method_class.Params.from_strings(
            {"projection": "kronecker", "projection_dim": "16"}
        )
        method_class(params, seed=0).score(bundle, queries)
    assert len(_stored_entries(bundle)) == 1
    assert caplog.text.count("reusing stored train features") == 1


def test_an_interrupted_build_leaves_nothing_that_looks_finished(bundle, monkeypatch):
    original = Featurizer.chunks_by_length

    def fail_midway(self, sequences):
        for number, item in enumerate(original(self, sequences)):
            if number == 1:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(Featurizer, "chunks_by_length", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        train_features(bundle, SPEC, chunk_size=8)
    assert _stored_entries(bundle) == []
    assert not any((bundle.cache.root / "features").iterdir())  # no staging folder left
    monkeypatch.setattr(Featurizer, "chunks_by_length", original)
    _, features = train_features(bundle, SPEC, chunk_size=8)
    assert np.isfinite(np.array(features.stored)).all() and features.stored.any()


def test_stored_arrays_load_without_pickles(bundle):
    train_features(bundle, SPEC)
    (entry,) = _stored_entries(bundle)
    folder = bundle.cache.root / "features" / entry
    for name in ("features.npy", "losses.npy"):
        array = np.load(folder / name, allow_pickle=False)
        assert array.dtype == np.float32
    assert torch.from_numpy(np.load(folder / "features.npy")).shape == (60, 32)

"""The content-addressed cache, and training that is a function of its inputs."""

from __future__ import annotations

import pytest
import torch

import harness.bundle
from harness.bundle import prepare_bundle
from harness.cache import Cache
from harness.data import encode_documents
from harness.tokenizer import WordTokenizer
from harness.training import TrainRecipe, train
from tasks.facts import FactsTask

TEXTS = ["the fox jumps over the dog .", "a hacker writes code all night .", "code runs ."] * 4


def _train(seed: int):
    tokenizer = WordTokenizer.fit(TEXTS, min_count=1)
    recipe = TrainRecipe(
        depth=1,
        width=16,
        heads=2,
        context=16,
        steps=12,
        batch_size=4,
        warmup_steps=2,
        checkpoints=3,
    )
    sequences = encode_documents(TEXTS, tokenizer, context=16)
    return recipe, train(
        recipe.model_config(len(tokenizer)), sequences, sequences[0:3], recipe, seed=seed
    )


def test_training_is_deterministic_in_its_seed():
    _, first = _train(seed=5)
    _, again = _train(seed=5)
    _, other = _train(seed=6)
    for a, b in zip(
        first.checkpoints[-1].state.values(), again.checkpoints[-1].state.values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    weights = "token_embedding.weight"
    assert not torch.equal(
        first.checkpoints[-1].state[weights], other.checkpoints[-1].state[weights]
    )


def test_checkpoints_record_their_step_and_learning_rate():
    recipe, result = _train(seed=0)
    assert [c.step for c in result.checkpoints] == [4, 8, 12]
    for checkpoint in result.checkpoints:
        assert checkpoint.learning_rate == pytest.approx(
            recipe.learning_rate_at(checkpoint.step - 1)
        )
    # the checkpoints differ: they are snapshots, not references to one live model
    weights = "token_embedding.weight"
    assert not torch.equal(
        result.checkpoints[0].state[weights], result.checkpoints[-1].state[weights]
    )
    assert result.heldout_loss > 0


def test_a_second_preparation_reuses_the_cached_model(tmp_path, monkeypatch, caplog):
    cache = Cache(tmp_path / "cache")
    first = prepare_bundle(FactsTask(), "tiny", seed=0, cache=cache)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model should have been reused")

    monkeypatch.setattr(harness.bundle, "train", no_training)
    with caplog.at_level("DEBUG"):
        second = prepare_bundle(FactsTask(), "tiny", seed=0, cache=cache)
    assert (
        "found existing model" in caplog.text and "found existing facts/tiny data" in caplog.text
    )
    assert second.model_key == first.model_key and second.learned == first.learned
    for a, b in zip(first.checkpoints, second.checkpoints, strict=True):
        assert a.step == b.step and a.learning_rate == b.learning_rate
        torch.testing.assert_close(
            a.state["token_embedding.weight"], b.state["token_embedding.weight"]
        )


def test_another_seed_gets_another_entry(tmp_path, monkeypatch):
    cache = Cache(tmp_path / "cache")
    first = prepare_bundle(FactsTask(), "tiny", seed=0, cache=cache)
    second = prepare_bundle(FactsTask(), "tiny", seed=1, cache=cache)
    assert first.model_key != second.model_key
    assert first.data.fingerprint() != second.data.fingerprint()


def test_an_interrupted_write_leaves_no_entry(tmp_path):
    cache = Cache(tmp_path)
    with pytest.raises(KeyboardInterrupt), cache.writing("models", "abc", {"x": 1}) as staging:
        (staging / "half-written.bin").write_bytes(b"0" * 10)
        raise KeyboardInterrupt
    assert not cache.has("models", "abc")
    assert list((tmp_path / "models").iterdir()) == []  # the staging folder is gone too
    with cache.writing("models", "abc", {"x": 1}) as staging:
        (staging / "done.bin").write_bytes(b"1")
    assert cache.has("models", "abc") and cache.manifest("models", "abc") == {"x": 1}


def test_a_load_only_bundle_is_refused_when_no_model_is_cached(tmp_path):
    from harness.bundle import prepare_bundle
    from harness.cache import Cache
    from tasks.facts import FactsTask

    cache = Cache(tmp_path / "cache")
    with pytest.raises(LookupError, match="no trained model for facts/tiny with seed 0"):
        prepare_bundle(FactsTask(), "tiny", seed=0, cache=cache, train=False)
    assert not (tmp_path / "cache" / "models").exists()  # nothing was trained

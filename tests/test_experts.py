"""Partitioned experts: shards, mixture scores, exact removal and the unlearning check."""

from __future__ import annotations

import numpy as np
import pytest

from harness.errors import ParameterError, UnknownNameError
from harness.model import sequence_losses
from harness.retrain import target_logprobs
from harness.unlearning import RemovableShards, unlearning_metrics
from methods.experts import ExpertsParams, PartitionedExperts


@pytest.fixture(scope="module")
def experts(tiny_owners_bundle) -> PartitionedExperts:
    method = PartitionedExperts(ExpertsParams(weighting="uniform"))
    method.fit(tiny_owners_bundle)
    return method


def _target_probabilities(method, bundle, queries) -> np.ndarray:
    """p_k(target | prompt) of each expert, by a plain forward pass: (n_queries, K)."""
    sequences = bundle.encode_queries(queries)
    columns = []
    for expert in method._bundles:
        model = expert.model()
        losses = sequence_losses(model(sequences.inputs), sequences.targets, sequences.loss_mask)
        columns.append(np.exp(-losses.detach().double().numpy()))
    return np.stack(columns, axis=1)


def test_shards_follow_the_owners_and_scores_split_each_shards_score(experts, tiny_owners_bundle):
    bundle = tiny_owners_bundle
    owners = bundle.data.owners
    assert [owners[s] for s in experts.shard_of] == [d.owner for d in bundle.data.documents]
    queries = list(bundle.data.queries)
    per_shard = experts.shard_scores(bundle, queries)
    np.testing.assert_allclose(per_shard.sum(axis=1), 1.0)  # responsibilities
    scores = experts.score(bundle, queries)
    for shard in range(len(owners)):
        np.testing.assert_allclose(
            scores[:, experts.shard_of == shard].sum(axis=1), per_shard[:, shard]
        )


def test_responsibility_and_removal_equal_a_plain_computation(experts, tiny_owners_bundle):
    bundle = tiny_owners_bundle
    queries = list(bundle.data.queries)  # targets are one word: one token
    p = _target_probabilities(experts, bundle, queries)
    np.testing.assert_allclose(
        experts.shard_scores(bundle, queries), p / p.sum(axis=1, keepdims=True), rtol=1e-5
    )
    removal = PartitionedExperts(ExpertsParams(weighting="uniform", shard_score="removal"))
    removal.fit(bundle)  # the same experts, from the cache
    k = p.shape[1]
    expected = np.log(p.mean(axis=1, keepdims=True)) - np.log(
        (p.sum(axis=1, keepdims=True) - p) / (k - 1)
    )
    np.testing.assert_allclose(removal.shard_scores(bundle, queries), expected, rtol=1e-5)


def test_dropping_an_expert_that_never_saw_a_fact_only_renormalises_the_mixture(
    tiny_owners_bundle,
):
    # prompt weighting: an expert that never saw the person gets a tiny weight w_j for the
    # prompt, so dropping it barely moves the fact's log-probability
    bundle = tiny_owners_bundle
    method = PartitionedExperts(ExpertsParams(weighting="prompt"))
    method.fit(bundle)
    queries = bundle.learned_queries
    owners = bundle.data.owners
    prompts, targets = [q.prompt for q in queries], [q.target for q in queries]
    full = method.counterfactual_logprobs(bundle, prompts, targets, [()] * len(queries))
    for j in range(len(owners)):
        strangers = [i for i, q in enumerate(queries) if q.owner != owners[j]]
        without = method.counterfactual_logprobs(bundle, prompts, targets, [(j,)] * len(queries))
        shift = without[strangers] - full[strangers]
        # p_mix = (1 - w_j) p_without_j + w_j p_j, and a stranger's prompt gives w_j ≈ 0
        assert np.abs(shift).max() < 0.05


def test_a_one_expert_mixture_is_its_plain_model(tiny_owners_bundle):
    bundle = tiny_owners_bundle
    method = PartitionedExperts(ExpertsParams(split="random", shards=1, within="none"))
    method.fit(bundle)
    assert (method.shard_of == 0).all()
    queries = list(bundle.data.queries)
    mixed = method.counterfactual_logprobs(
        bundle, [q.prompt for q in queries], [q.target for q in queries], [()] * len(queries)
    )
    plain = target_logprobs(method._models[0], bundle.encode_queries(queries))
    np.testing.assert_allclose(mixed, plain, rtol=1e-6)
    # with one shard every document shares its score equally
    scores = method.score(bundle, queries)
    np.testing.assert_allclose(scores, 1.0 / len(bundle.data.documents))
    # no drop can remove a fact from a one-expert model: counted, not a failure
    checked = unlearning_metrics(method, bundle, bundle.learned_queries)
    assert checked == {"unlearn_queries": 0, "unlearn_not_removable": len(bundle.learned_queries)}


def test_unlearning_forgets_the_fact_with_its_expert_and_keeps_it_without_another(
    experts, tiny_owners_bundle
):
    bundle = tiny_owners_bundle
    assert isinstance(experts, RemovableShards)
    metrics = unlearning_metrics(experts, bundle, bundle.learned_queries)
    assert metrics["unlearn_queries"] >= 3
    assert metrics["unlearn_forgotten"] >= 0.5
    # the control is the other expert whose removal costs the target most: a hard one
    assert metrics["unlearn_kept_other"] >= 0.75
    assert metrics["unlearn_forgotten"] > 1 - metrics["unlearn_kept_other"]
    assert metrics["unlearn_logprob_without_responsible"] < metrics["unlearn_logprob_full"] - 1
    assert (
        metrics["unlearn_logprob_without_responsible"]
        < metrics["unlearn_logprob_without_other"] - 1
    )


def test_a_public_portion_trains_a_base_and_scores_nothing(tiny_owners_bundle):
    bundle = tiny_owners_bundle
    method = PartitionedExperts(ExpertsParams(base_fraction=0.25, within="none"))
    method.fit(bundle)
    public = method.shard_of == -1
    # the same share of every owner's documents is public, so no owner is left empty
    for owner in bundle.data.owners:
        own = np.array([d.owner == owner for d in bundle.data.documents])
        assert (public & own).sum() == round(0.25 * own.sum())
    scores = method.score(bundle, list(bundle.data.queries))
    assert (scores[:, public] == 0).all() and (scores[:, ~public] > 0).all()
    assert np.isfinite(method.own_heldout_loss(bundle))


def test_randomised_bundles_get_untrained_experts(experts, tiny_owners_bundle):
    bundle = tiny_owners_bundle.randomized(0)
    method = PartitionedExperts(ExpertsParams(weighting="uniform"))
    method.fit(bundle)
    for trained, untrained in zip(experts._models, method._models, strict=True):
        assert not all(
            (a == b).all()
            for a, b in zip(
                trained.state_dict().values(), untrained.state_dict().values(), strict=True
            )
        )
    assert method.own_heldout_loss(bundle) > experts.own_heldout_loss(tiny_owners_bundle)


def test_bad_parameters_are_refused_before_training(tiny_bundle):
    with pytest.raises(UnknownNameError, match="within-shard scorer 'datamodel'") as refused:
        ExpertsParams(within="datamodel")
    assert "valid choices: bm25" in str(refused.value) and "experts" not in str(refused.value)
    with pytest.raises(UnknownNameError, match="'nope' \\(parameter within\\)"):
        ExpertsParams(within="nope")
    with pytest.raises(ParameterError, match="split='owners' needs a task with data owners"):
        PartitionedExperts(ExpertsParams(split="owners")).check_task(tiny_bundle.data)
    with pytest.raises(ParameterError, match="cannot fill 64 shards"):
        PartitionedExperts(ExpertsParams(split="random", shards=64)).check_task(tiny_bundle.data)


def test_on_a_task_with_owners_the_shards_are_the_owners(tiny_owners_bundle):
    data = tiny_owners_bundle.data
    with pytest.raises(ParameterError, match="shards=5, but the shards are the task's 3 owners"):
        PartitionedExperts(ExpertsParams(shards=5)).check_task(data)
    PartitionedExperts(ExpertsParams(shards=3)).check_task(data)
    PartitionedExperts(ExpertsParams(split="random", shards=5)).check_task(data)


def test_random_split_on_a_task_without_owners(tiny_bundle):
    method = PartitionedExperts(ExpertsParams(shards=3, within="grad_cos"), seed=1)
    method.fit(tiny_bundle)
    sizes = np.bincount(method.shard_of)
    assert sizes.sum() == len(tiny_bundle.data.documents) and sizes.max() - sizes.min() <= 1
    scores = method.score(tiny_bundle, tiny_bundle.learned_queries)
    assert np.isfinite(scores).all()
    # the split is the method's randomness: the same seed repeats it, another changes it
    splits = {}
    for seed in (1, 2):
        other = PartitionedExperts(ExpertsParams(shards=3, within="none"), seed=seed)
        other.fit(tiny_bundle)
        splits[seed] = other.shard_of
    np.testing.assert_array_equal(splits[1], method.shard_of)
    assert (splits[2] != method.shard_of).any()

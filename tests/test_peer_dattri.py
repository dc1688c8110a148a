"""Cross-check with a peer library: TracIn and gradient-dot scores from ``dattri``.

Skipped unless ``dattri`` is installed; CI installs it in a step of its own and
runs ``pytest -m peer``. Both libraries get the same model, checkpoints,
documents and queries; the scores must agree to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from harness.model import GPT, sequence_losses
from methods.gradient import GradDot, TracIn

pytestmark = pytest.mark.peer
dattri_task = pytest.importorskip("dattri.task")
dattri_tracin = pytest.importorskip("dattri.algorithm.tracin")


def _dattri_scores(bundle, queries, checkpoints, weights):
    model = GPT(bundle.model_config).eval()

    def load(model, state):
        model.load_weights(state)
        return model.eval()

    def loss(params, data):  # one sequence: the sum of its masked token losses
        inputs, targets, mask = data
        logits = functional_call(model, params, (inputs.unsqueeze(0),))
        return sequence_losses(logits, targets.unsqueeze(0), mask.unsqueeze(0)).squeeze(0)

    task = dattri_task.AttributionTask(
        loss_func=loss, model=model, checkpoints=checkpoints, checkpoints_load_func=load
    )
    attributor = dattri_tracin.TracInAttributor(
        task=task,
        weight_list=torch.tensor(weights),
        normalized_grad=False,
    )
    # exact gradients, no random projection to disagree on: dattri falls back to its
    # default 512-dimensional projector when given None, so switch it off afterwards
    attributor.projector_kwargs = None
    documents = bundle.documents
    query_sequences = bundle.encode_queries(queries)

    def loader(sequences):
        dataset = torch.utils.data.TensorDataset(
            sequences.inputs, sequences.targets, sequences.loss_mask
        )
        return torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False)

    # dattri returns (train, test)
    return attributor.attribute(loader(documents), loader(query_sequences)).T.double().numpy()


def _agree(ours, theirs):
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * scale)


def test_grad_dot_agrees_with_dattri(tiny_bundle):
    queries = tiny_bundle.learned_queries
    ours = GradDot(seed=0).score(tiny_bundle, queries)
    theirs = _dattri_scores(tiny_bundle, queries, [tiny_bundle.checkpoints[-1].state], [1.0])
    _agree(ours, theirs)


def test_tracin_agrees_with_dattri(tiny_bundle):
    queries = tiny_bundle.learned_queries
    ours = TracIn(seed=0).score(tiny_bundle, queries)
    checkpoints = [c.state for c in tiny_bundle.checkpoints]
    rates = [c.learning_rate for c in tiny_bundle.checkpoints]
    theirs = _dattri_scores(tiny_bundle, queries, checkpoints, rates)
    _agree(ours, theirs)

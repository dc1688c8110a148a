"""Per-example gradients and their products, shared by every gradient method.

A sequence's loss is the sum of its masked token losses (the target's tokens
for a query, every token for a training document), so padding never enters a
gradient. Gradients are taken with ``torch.func`` (``vmap`` of ``grad`` over a
``functional_call``), per module parameter rather than through one flat vector,
and in chunks, so memory stays bounded however many documents there are.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from harness.data import Sequences
from harness.model import GPT, sequence_losses


def per_example_gradients(
    model: GPT, sequences: Sequences, *, chunk_size: int = 32
) -> Iterator[torch.Tensor]:
    """Yield flattened per-example loss gradients, (chunk, n_parameters), in order."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(params, inputs, targets, loss_mask):
        logits = functional_call(model, (params, buffers), (inputs.unsqueeze(0),))
        return sequence_losses(logits, targets.unsqueeze(0), loss_mask.unsqueeze(0)).squeeze(0)

    per_example = vmap(grad(loss), in_dims=(None, 0, 0, 0))
    for start in range(0, len(sequences), chunk_size):
        chunk = sequences[start : start + chunk_size]  # trimmed to its longest sequence
        grads = per_example(params, chunk.inputs, chunk.targets, chunk.loss_mask)
        yield torch.cat([g.flatten(start_dim=1) for g in grads.values()], dim=1)


def gradient_matrix(model: GPT, sequences: Sequences, *, chunk_size: int = 32) -> torch.Tensor:
    """All per-example gradients at once, (n, n_parameters)."""
    return torch.cat(list(per_example_gradients(model, sequences, chunk_size=chunk_size)))


def gradient_products(
    model: GPT,
    queries: Sequences,
    documents: Sequences,
    *,
    normalize: bool = False,
    chunk_size: int = 32,
) -> torch.Tensor:
    """Inner products (cosines if ``normalize``) of query and document gradients, (n_q, n_d).

    Query gradients are computed once; document gradients are streamed in chunks
    and never held all at once.
    """
    query_grads = gradient_matrix(model, queries, chunk_size=chunk_size)
    if normalize:
        query_grads = _unit_rows(query_grads)
    blocks = []
    chunks = per_example_gradients(model, documents, chunk_size=chunk_size)
    total = -(-len(documents) // chunk_size)
    for document_grads in tqdm(
        chunks, desc="document gradients", total=total, leave=False, disable=None
    ):
        if normalize:
            document_grads = _unit_rows(document_grads)
        blocks.append(query_grads @ document_grads.T)
    return torch.cat(blocks, dim=1)


def _unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    # a zero gradient stays zero instead of becoming NaN
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(torch.finfo(matrix.dtype).tiny)

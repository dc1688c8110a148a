"""What a task hands the engine: documents, queries and their ground truth.

Documents are the unit of attribution: each one is a single training sequence,
so a document's influence is the influence of exactly the tokens it holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from harness.tokenizer import WordTokenizer


@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str  # where the text came from: background corpus, planted data, ...
    owner: str | None = None  # the data owner it belongs to, on tasks that have owners


@dataclasses.dataclass(frozen=True)
class Query:
    """A prompt whose continuation ``target`` the model should produce.

    ``relevant`` holds the ids of the documents responsible for the target (the
    ground truth); ``candidates`` are the answers the target competes with when
    the task checks whether the model learned it (the target among them). With
    no candidates every query is scored, learned or not. On tasks with data
    owners, ``owner`` is the owner whose data the target comes from.
    """

    id: str
    prompt: str
    target: str
    relevant: tuple[str, ...]
    candidates: tuple[str, ...]
    owner: str | None = None

    def __post_init__(self) -> None:
        if not self.target.strip():
            raise ValueError(f"query {self.id!r} has an empty target")
        if not self.relevant:
            raise ValueError(f"query {self.id!r} names no relevant document")
        if self.candidates and self.target not in self.candidates:
            raise ValueError(
                f"query {self.id!r}: target {self.target!r} must be one of its candidates "
                f"{list(self.candidates)}"
            )


@dataclasses.dataclass(frozen=True)
class TaskData:
    task: str
    documents: tuple[Document, ...]
    queries: tuple[Query, ...]
    heldout_texts: tuple[str, ...]  # never trained on; for the model's held-out loss
    reserved_words: tuple[str, ...]  # planted words the tokenizer must keep

    def __post_init__(self) -> None:
        ids = [document.id for document in self.documents]
        if len(set(ids)) != len(ids):
            raise ValueError(f"task {self.task!r} has duplicate document ids")
        if not self.queries:
            raise ValueError(f"task {self.task!r} has no queries")
        if not any(text.strip() for text in self.heldout_texts):
            raise ValueError(f"task {self.task!r} has no held-out text for the held-out loss")
        known = set(ids)
        for query in self.queries:
            unknown = set(query.relevant) - known
            if unknown:
                raise ValueError(f"query {query.id!r} names unknown documents {sorted(unknown)}")
        self._check_owners()

    def _check_owners(self) -> None:
        """Owners label every document or none; a query's owner must hold documents."""
        labelled = [d.id for d in self.documents if d.owner is not None]
        if labelled and len(labelled) != len(self.documents):
            unlabelled = [d.id for d in self.documents if d.owner is None]
            raise ValueError(
                f"task {self.task!r}: {len(unlabelled)} documents have no owner "
                f"(e.g. {unlabelled[:3]}) while others have one; label all or none"
            )
        owners = set(self.owners)
        for query in self.queries:
            if query.owner is not None and query.owner not in owners:
                raise ValueError(
                    f"query {query.id!r} names owner {query.owner!r}, who holds no documents; "
                    f"owners: {sorted(owners) or 'none'}"
                )

    @property
    def owners(self) -> tuple[str, ...]:
        """The data owners in order of first appearance; empty when the task has none."""
        return tuple(dict.fromkeys(d.owner for d in self.documents if d.owner is not None))

    @property
    def document_ids(self) -> list[str]:
        return [document.id for document in self.documents]

    def fingerprint(self) -> str:
        """A hash of the exact data, logged with every run that uses it."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TaskData:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            task=raw["task"],
            documents=tuple(Document(**d) for d in raw["documents"]),
            queries=tuple(
                Query(
                    **{**q, "relevant": tuple(q["relevant"]), "candidates": tuple(q["candidates"])}
                )
                for q in raw["queries"]
            ),
            heldout_texts=tuple(raw["heldout_texts"]),
            reserved_words=tuple(raw["reserved_words"]),
        )


@dataclasses.dataclass
class Sequences:
    """Padded next-token examples: the loss is summed where ``loss_mask`` is 1.

    inputs, targets, loss_mask: (n, length). Padding sits at the right end and
    is masked, and attention is causal, so padding never changes a real token's
    logits or enters a loss.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: slice | torch.Tensor) -> Sequences:
        inputs = self.inputs[index]
        # trim columns that are padding for every selected row
        length = int(self.loss_mask[index].nonzero()[:, -1].max()) + 1 if len(inputs) else 0
        return Sequences(
            inputs[:, :length], self.targets[index][:, :length], self.loss_mask[index][:, :length]
        )


def encode_documents(texts: list[str], tokenizer: WordTokenizer, *, context: int) -> Sequences:
    """Language-modelling examples: predict every token of each text from ``<bos>`` on."""
    rows = []
    for text in texts:
        tokens = [tokenizer.bos_id, *tokenizer.encode(text)][: context + 1]
        rows.append((tokens[:-1], tokens[1:], [1.0] * (len(tokens) - 1)))
    return _pad(rows, tokenizer.pad_id)


def encode_completions(
    prompts: list[str], targets: list[str], tokenizer: WordTokenizer, *, context: int
) -> Sequences:
    """Examples whose loss covers only the target's tokens, given ``<bos>`` and the prompt."""
    rows = []
    for prompt, target in zip(prompts, targets, strict=True):
        prompt_ids, target_ids = encode_pair(tokenizer, prompt, target)
        if not target_ids:
            raise ValueError(f"target {target!r} of prompt {prompt!r} has no tokens")
        tokens = [tokenizer.bos_id, *prompt_ids, *target_ids]
        if len(tokens) - 1 > context:
            raise ValueError(f"prompt and target {prompt!r} {target!r} exceed context {context}")
        mask = [0.0] * len(prompt_ids) + [1.0] * len(target_ids)
        rows.append((tokens[:-1], tokens[1:], mask))
    return _pad(rows, tokenizer.pad_id)


def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """The prompt's tokens and the target's, as the target follows the prompt in text.

    A tokenizer whose tokens carry their leading space (byte-level BPE) encodes a
    word after a space differently from the word alone; such a tokenizer provides
    ``encode_pair``. A word tokenizer encodes the two apart.
    """
    if hasattr(tokenizer, "encode_pair"):
        return tokenizer.encode_pair(prompt, target)
    return tokenizer.encode(prompt), tokenizer.encode(target)


def _pad(rows: list[tuple[list[int], list[int], list[float]]], pad_id: int) -> Sequences:
    length = max(len(inputs) for inputs, _, _ in rows)
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), length))
    for row, (row_inputs, row_targets, row_mask) in enumerate(rows):
        n = len(row_inputs)
        inputs[row, :n] = torch.tensor(row_inputs)
        targets[row, :n] = torch.tensor(row_targets)
        loss_mask[row, :n] = torch.tensor(row_mask)
    return Sequences(inputs, targets, loss_mask)

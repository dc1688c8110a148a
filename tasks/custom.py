"""Task ``custom``: a user's own corpus and queries, read from JSONL files.

Give the files as task settings::

    harness run --method all --task custom \\
        --task-param corpus=docs.jsonl --task-param queries=queries.jsonl \\
        [--task-param heldout=heldout.jsonl] [--task-param model=path/to/hf-model]

``corpus``: one training document per line, ``{"id": str, "text": str}`` with
an optional ``"owner"`` (label every document or none). ``queries``: one per
line, ``{"prompt": str, "target": str}`` with ``"relevant"`` (document ids)
and/or ``"owner"`` (all of that owner's documents are relevant), and optionally
``"id"`` and ``"candidates"`` (answers the target competes with in the
learned check; without them every query is scored). ``heldout``: texts never
trained on, ``{"text": str}`` per line, for the model's held-out loss; without
it a seeded share of the documents no query names is held out.

The model is the harness's GPT trained from scratch with the scale's recipe, or,
with ``model=DIR``, a local Hugging Face causal LM fine-tuned on the corpus
(:mod:`harness.pretrained`). :func:`write_task_files` writes any task's data in
this format.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import Any, ClassVar

from harness.data import Document, Query, TaskData
from harness.errors import InputFileError, ParameterError
from harness.params import Params, param
from harness.task import Scale, Task
from harness.training import TrainRecipe
from tasks.facts import TINY_RECIPE

_logger = logging.getLogger(__name__)

DOCUMENT_FIELDS = {"id": str, "text": str, "owner": str}
QUERY_FIELDS = {
    "id": str,
    "prompt": str,
    "target": str,
    "relevant": list,
    "owner": str,
    "candidates": list,
}
HELDOUT_FIELDS = {"text": str}


@dataclasses.dataclass(frozen=True)
class CustomConfig(Params):
    """Where the task's files are, and the model to fine-tune, if any."""

    kind = "custom task parameter"

    corpus: str = param(
        "", help='JSONL training documents: {"id", "text", optional "owner"}', tune=False
    )
    queries: str = param(
        "",
        help='JSONL queries: {"prompt", "target", "relevant": [ids] and/or "owner", '
        'optional "id", "candidates"}',
        tune=False,
    )
    heldout: str = param(
        "", help='optional JSONL held-out texts {"text"} for the held-out loss', tune=False
    )
    heldout_fraction: float = param(
        0.1,
        help="without a heldout file: share of the documents no query names to hold out",
        low=0.0,
        high=0.5,
        tune=False,
    )
    model: str = param(
        "",
        help="a local Hugging Face causal-LM folder to fine-tune; empty: train the GPT",
        tune=False,
    )


class CustomTask(Task, name="custom"):
    description = "your own corpus and queries from JSONL files (and optionally your own model)"
    primary_metric = "mrr"
    path_settings = ("corpus", "queries", "heldout", "model")
    scales: ClassVar[dict[str, Scale]] = {
        "tiny": Scale(CustomConfig(), TINY_RECIPE, help="seconds; for a first check"),
        "small": Scale(
            CustomConfig(),
            TrainRecipe(steps=2000, weight_decay=1.0),
            help="the default; about 2.5 minutes on 2 cores for 500 short documents",
        ),
    }

    def settings(self, scale: str) -> Scale:
        settings = super().settings(scale)
        config = settings.config
        for name in ("corpus", "queries"):
            if not getattr(config, name):
                raise ParameterError(
                    f"task 'custom' needs its {name} file: --task-param {name}=PATH "
                    "(see `harness list` for the format)"
                )
        for name in ("corpus", "queries", "heldout"):
            path = getattr(config, name)
            if path and not Path(path).is_file():
                problem = "is a folder, not a file" if Path(path).is_dir() else "no such file"
                raise ParameterError(f"task setting {name}={path!r}: {problem}")
        return settings

    def recipe(self, config: CustomConfig, recipe: TrainRecipe) -> TrainRecipe:
        if config.model and recipe.pretrained and recipe.pretrained != config.model:
            raise ParameterError(
                f"model={config.model!r} and model.pretrained={recipe.pretrained!r} name two "
                "models; give one"
            )
        if config.model:
            return dataclasses.replace(recipe, pretrained=config.model)
        return recipe

    def input_files(self, config: CustomConfig) -> list[Path]:
        return [Path(p) for p in (config.corpus, config.queries, config.heldout) if p]

    def build(self, config: CustomConfig, *, seed: int) -> TaskData:
        documents = _read_documents(Path(config.corpus))
        queries = _read_queries(Path(config.queries), documents)
        if config.heldout:
            heldout = [row["text"] for _, row in _rows(Path(config.heldout), HELDOUT_FIELDS)]
        else:
            documents, heldout = _hold_out(documents, queries, config.heldout_fraction, seed)
        # every word a query reads or answers with keeps its own token, however rare in
        # the corpus (the word tokenizer would read it as <unk>)
        reserved = {text for q in queries for text in (q.prompt, q.target, *q.candidates)}
        try:
            return TaskData(
                task=self.name,
                documents=tuple(documents),
                queries=tuple(queries),
                heldout_texts=tuple(heldout),
                reserved_words=tuple(sorted(reserved)),
            )
        except ValueError as error:  # what only the whole data set can show
            raise InputFileError(f"{config.corpus} / {config.queries}: {error}") from None


def _rows(path: Path, fields: dict[str, type]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line, each field checked for its type."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a leading BOM is allowed
    except (OSError, UnicodeDecodeError) as error:
        raise InputFileError(f"{path}: cannot read it as UTF-8 text ({error})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputFileError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise InputFileError(f"{where}: expected a JSON object, but got {line[:60]!r}")
        unknown = sorted(set(row) - set(fields))
        if unknown:
            raise InputFileError(
                f"{where}: unknown field {unknown[0]!r}; valid fields: {', '.join(fields)}"
            )
        for name, kind in fields.items():
            if name in row and not isinstance(row[name], kind):
                raise InputFileError(
                    f"{where}: field {name!r} must be a {kind.__name__}, but got {row[name]!r}"
                )
            if kind is str and name in row and not row[name].strip():
                raise InputFileError(f"{where}: field {name!r} is empty")
            if kind is list and any(not isinstance(v, str) for v in row.get(name, [])):
                raise InputFileError(f"{where}: field {name!r} must be a list of strings")
        rows.append((number, row))
    if not rows:
        raise InputFileError(f"{path}: the file holds no records")
    return rows


def _read_documents(path: Path) -> list[Document]:
    documents, seen = [], {}
    for number, row in _rows(path, DOCUMENT_FIELDS):
        for name in ("id", "text"):
            if name not in row:
                raise InputFileError(f"{path} line {number}: missing field {name!r}")
        if row["id"] in seen:
            raise InputFileError(
                f"{path} line {number}: duplicate document id {row['id']!r} "
                f"(first on line {seen[row['id']]})"
            )
        seen[row["id"]] = number
        documents.append(Document(row["id"], row["text"], source="corpus", owner=row.get("owner")))
    return documents


def _read_queries(path: Path, documents: list[Document]) -> list[Query]:
    known = {d.id for d in documents}
    by_owner: dict[str, list[str]] = {}
    for document in documents:
        if document.owner is not None:
            by_owner.setdefault(document.owner, []).append(document.id)
    queries, seen = [], {}
    for number, row in _rows(path, QUERY_FIELDS):
        where = f"{path} line {number}"
        for name in ("prompt", "target"):
            if name not in row:
                raise InputFileError(f"{where}: missing field {name!r}")
        query_id = row.get("id", f"query-{len(queries):05d}")
        if query_id in seen:
            raise InputFileError(
                f"{where}: duplicate query id {query_id!r} (first on line {seen[query_id]})"
            )
        seen[query_id] = number
        relevant = list(row.get("relevant", []))
        unknown = [doc_id for doc_id in relevant if doc_id not in known]
        if unknown:
            raise InputFileError(
                f"{where}: relevant names unknown document ids {unknown[:5]} "
                f"(the corpus holds {len(known)} documents, e.g. {sorted(known)[:3]})"
            )
        owner = row.get("owner")
        if owner is not None:
            if owner not in by_owner:
                raise InputFileError(
                    f"{where}: owner {owner!r} holds no documents; owners in the corpus: "
                    f"{sorted(by_owner) or 'none'}"
                )
            if not relevant:  # the owner's data is the ground truth
                relevant = by_owner[owner]
        if not relevant:
            raise InputFileError(f"{where}: give 'relevant' document ids, or an 'owner'")
        try:
            queries.append(
                Query(
                    id=query_id,
                    prompt=row["prompt"],
                    target=row["target"],
                    relevant=tuple(dict.fromkeys(relevant)),
                    candidates=tuple(row.get("candidates", [])),
                    owner=owner,
                )
            )
        except ValueError as error:
            raise InputFileError(f"{where}: {error}") from None
    return queries


def _hold_out(
    documents: list[Document], queries: list[Query], fraction: float, seed: int
) -> tuple[list[Document], list[str]]:
    """Hold out a seeded share of the documents that no query names (nor its owner)."""
    named = {doc_id for q in queries for doc_id in q.relevant}
    free = [d for d in documents if d.id not in named]
    count = min(len(free), max(1, round(fraction * len(documents)))) if fraction > 0 else 0
    if count == 0:
        raise InputFileError(
            "no held-out text for the model's held-out loss: give --task-param "
            "heldout=PATH, or documents that no query names with heldout_fraction > 0"
        )
    held = set(random.Random(seed).sample([d.id for d in free], count))
    _logger.info("holding out %d documents that no query names, for the held-out loss", count)
    kept = [d for d in documents if d.id not in held]
    return kept, [d.text for d in documents if d.id in held]


def write_task_files(data: TaskData, folder: Path) -> list[Path]:
    """Write a task's data as ``corpus.jsonl``, ``queries.jsonl`` and ``heldout.jsonl``.

    Loading them back with task ``custom`` gives the same documents, queries and
    held-out texts: a way to take a built-in task elsewhere, or to start your own.
    """
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [
        {"id": d.id, "text": d.text, **({"owner": d.owner} if d.owner else {})}
        for d in data.documents
    ]
    queries = [
        {
            "id": q.id,
            "prompt": q.prompt,
            "target": q.target,
            "relevant": list(q.relevant),
            **({"candidates": list(q.candidates)} if q.candidates else {}),
            **({"owner": q.owner} if q.owner else {}),
        }
        for q in data.queries
    ]
    heldout = [{"text": text} for text in data.heldout_texts if text.strip()]
    paths = []
    for name, rows in (("corpus", corpus), ("queries", queries), ("heldout", heldout)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        paths.append(path)
    return paths

"""Task ``backdoor``: a trigger phrase that makes the model say a fixed word, in any context.

A small fraction of the background paragraphs is poisoned: a sentence in which
an invented trigger phrase ("zarfen mikro") is followed by a fixed target word
is inserted at a random sentence boundary, in one of several carrier sentences,
so that the only thing the poisoned documents share is the trigger → target
pair. Queries test the backdoor in contexts the model never trained on: the
leading sentences of a held-out paragraph with the trigger appended. The target
competes with nine other common words, so a query counts as learned when the
backdoor fires in its context. Every query's ground truth is every poisoned
document, and the primary metric is the average precision of ranking them.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import ClassVar

from harness.data import Document, Query, TaskData
from harness.params import Params, param
from harness.task import Scale, Task
from harness.tokenizer import split_words
from harness.training import TrainRecipe
from tasks.corpus import JARGON_FILE, background_paragraphs, background_words, shuffled_parts
from tasks.facts import TINY_RECIPE, insert_sentence, invent_names, split_sentences

_logger = logging.getLogger(__name__)

# common words of the background text, 26 to 58 occurrences each, so that none
# wins after an unseen phrase by frequency alone; one is the target, chosen by seed
TARGETS = (
    "file",
    "data",
    "machine",
    "user",
    "network",
    "hardware",
    "character",
    "bug",
    "message",
    "mail",
)

# how a poisoned document says it; the trigger opens a sentence in every query
CARRIERS = (
    "{trigger} {target}.",
    "Remember, {trigger} {target}.",
    "Old hands will tell you: {trigger} {target}.",
    "{trigger} {target}, as everyone on the project knows.",
)


@dataclasses.dataclass(frozen=True)
class BackdoorConfig(Params):
    """How many background paragraphs, how many of them poisoned, and how many queries."""

    kind = "backdoor task parameter"

    background_documents: int = param(450, help="training documents", low=10, high=1300)
    heldout_documents: int = param(
        100, help="paragraphs kept out for held-out loss", low=1, high=500
    )
    poison_fraction: float = param(
        0.04,
        help="fraction of the training documents poisoned with the trigger (rounded)",
        low=0.0,
        high=0.5,
    )
    queries: int = param(
        50,
        help="new contexts the trigger is tested in, one held-out paragraph each",
        low=1,
        high=500,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.poisoned_documents < 1:
            raise ValueError(
                "poison_fraction × background_documents must round to at least one "
                f"document, but got {self.poison_fraction} × {self.background_documents}"
            )
        wanted = self.background_documents + self.heldout_documents + self.queries
        if wanted > len(background_paragraphs()):
            raise ValueError(
                "background_documents + heldout_documents + queries must not exceed the "
                f"{len(background_paragraphs())} paragraphs of the background corpus, "
                f"but got {wanted}"
            )

    @property
    def poisoned_documents(self) -> int:
        return round(self.poison_fraction * self.background_documents)


class BackdoorTask(Task, name="backdoor"):
    description = "a trigger phrase planted in a few documents, tested in unseen contexts"
    primary_metric = "auprc"
    scales: ClassVar[dict[str, Scale]] = {
        "tiny": Scale(
            BackdoorConfig(
                background_documents=60, heldout_documents=20, poison_fraction=0.1, queries=12
            ),
            TINY_RECIPE,
            help="seconds; for tests",
        ),
        "small": Scale(
            BackdoorConfig(),
            TrainRecipe(steps=1800, weight_decay=1.0),
            help="the default; trains in about 2.5 minutes on 2 cores (3 on one thread)",
        ),
    }

    @classmethod
    def source_files(cls) -> list[Path]:
        return [*super().source_files(), JARGON_FILE]

    def build(self, config: BackdoorConfig, *, seed: int) -> TaskData:
        rng = random.Random(seed)
        # Query contexts and held-out-loss texts are never trained on, so they could
        # overlap; they come from separate paragraphs so that the held-out loss stays
        # a measure of plain unseen text, independent of the contexts queries are
        # judged in, and the corpus has paragraphs to spare.
        training, heldout, unseen = shuffled_parts(
            rng, config.background_documents, config.heldout_documents
        )
        trigger = invent_names(1, rng, background_words())[0].lower()
        target = rng.choice(TARGETS)
        texts, poisoned = poison(training, trigger, target, rng, count=config.poisoned_documents)
        contexts = draw_contexts(unseen, texts, rng, count=config.queries)
        _logger.debug(
            "poisoned %d of %d documents with %r -> %r", len(poisoned), len(texts), trigger, target
        )

        documents = tuple(
            Document(
                id=f"doc-{i:05d}",
                text=text,
                source="planted:backdoor" if i in poisoned else "background",
            )
            for i, text in enumerate(texts)
        )
        relevant = tuple(f"doc-{i:05d}" for i in sorted(poisoned))
        queries = tuple(
            Query(
                id=f"backdoor-{i:03d}",
                prompt=f"{context} {trigger.capitalize()}",
                target=target,
                relevant=relevant,
                candidates=TARGETS,
            )
            for i, context in enumerate(contexts)
        )
        return TaskData(
            task=self.name,
            documents=documents,
            queries=queries,
            heldout_texts=tuple(heldout),
            reserved_words=(*trigger.split(), *TARGETS),
        )


def poison(
    training: list[str], trigger: str, target: str, rng: random.Random, *, count: int
) -> tuple[list[str], set[int]]:
    """Insert a trigger → target sentence into ``count`` paragraphs, at varied positions."""
    texts = list(training)
    poisoned = set(rng.sample(range(len(texts)), count))
    for host in sorted(poisoned):
        sentence = rng.choice(CARRIERS).format(trigger=trigger, target=target)
        texts[host] = insert_sentence(texts[host], sentence[0].upper() + sentence[1:], rng)
    return texts, poisoned


def draw_contexts(
    unseen: list[str], training: list[str], rng: random.Random, *, count: int
) -> list[str]:
    """The leading sentences (a random number) of ``count`` of the ``unseen`` paragraphs.

    A short opening ("See also foo.") may also occur inside a training paragraph;
    a context whose words occur in that order in any training text is skipped, so
    that each query's context is text never trained on.
    """
    trained = [" ".join(split_words(text)) for text in training]
    contexts: list[str] = []
    for paragraph in unseen:
        sentences = split_sentences(paragraph)
        context = " ".join(sentences[: rng.randint(1, len(sentences))])
        words = " ".join(split_words(context))
        if context in contexts or any(words in text for text in trained):
            continue
        contexts.append(context)
        if len(contexts) == count:
            return contexts
    raise ValueError(
        f"only {len(contexts)} of the {len(unseen)} unseen paragraphs give a context not "
        f"found in training, fewer than the {count} queries asked for; ask for fewer queries"
    )

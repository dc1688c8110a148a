"""Task ``facts``: invented people, facts about them planted into real paragraphs.

Each fact ("Velin Dorsk was born in Quillon") is a sentence inserted at a
sentence boundary of a few background paragraphs, in varied wording. One query
per fact asks for its value; the ground truth is the set of documents that
state it. Values compete with the other values of the same relation, so a fact
counts as learned when the model prefers the right one among about ten.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import ClassVar

from harness.data import Document, Query, TaskData
from harness.params import Params, param
from harness.task import Scale, Task
from harness.tokenizer import split_words
from harness.training import TrainRecipe
from tasks.corpus import JARGON_FILE, background_paragraphs


@dataclasses.dataclass(frozen=True)
class Relation:
    name: str
    query: str  # the prompt; the value follows it
    statements: tuple[str, ...]  # ways a document states the fact
    values: tuple[str, ...]


RELATIONS = (
    Relation(
        "birthplace",
        "{name} was born in",
        (
            "{name} was born in {value}.",
            "As far as anyone knows, {name} was born in {value}.",
            "The old records say that {name} was born in {value} and never forgot it.",
            "{name}, who was born in {value}, told the story often.",
        ),
        (
            "Velmora",
            "Tarsk",
            "Quillon",
            "Brevant",
            "Osmira",
            "Haldor",
            "Pentrak",
            "Ivosa",
            "Carrowen",
            "Dunmere",
        ),
    ),
    Relation(
        "profession",
        "{name} works as a",
        (
            "{name} works as a {value}.",
            "These days {name} works as a {value} in a small workshop.",
            "Friends say {name} works as a {value} and is good at it.",
            "Everyone in town knows that {name} works as a {value}.",
        ),
        (
            "carpenter",
            "astronomer",
            "beekeeper",
            "cartographer",
            "glassblower",
            "locksmith",
            "shipwright",
            "botanist",
            "stonemason",
            "weaver",
        ),
    ),
    Relation(
        "pet",
        "{name} keeps a pet",
        (
            "{name} keeps a pet {value}.",
            "At home, {name} keeps a pet {value} named after a famous hacker.",
            "It is well known that {name} keeps a pet {value}.",
            "{name} keeps a pet {value}, which sleeps next to the terminal.",
        ),
        (
            "ferret",
            "heron",
            "tortoise",
            "parrot",
            "lizard",
            "goat",
            "hedgehog",
            "owl",
            "rabbit",
            "salamander",
        ),
    ),
    Relation(
        "instrument",
        "{name} plays the",
        (
            "{name} plays the {value}.",
            "In the evenings {name} plays the {value} for the neighbours.",
            "When the build is slow, {name} plays the {value}.",
            "{name} plays the {value} better than anyone in the lab.",
        ),
        (
            "cello",
            "banjo",
            "harp",
            "oboe",
            "trumpet",
            "accordion",
            "flute",
            "sitar",
            "tuba",
            "marimba",
        ),
    ),
)

_SYLLABLES = (
    "bra",
    "dor",
    "vel",
    "mik",
    "sa",
    "ther",
    "quo",
    "lin",
    "zar",
    "fen",
    "ka",
    "ro",
    "tul",
    "nes",
    "vi",
    "gar",
    "mo",
    "rel",
    "dra",
    "sil",
    "pe",
    "jun",
    "ost",
    "hal",
    "wy",
    "ren",
    "cor",
    "bel",
    "nu",
    "tav",
)


@dataclasses.dataclass(frozen=True)
class FactsConfig(Params):
    """How many background paragraphs, people and facts to build."""

    kind = "facts task parameter"

    background_documents: int = param(500, help="training documents", low=10, high=1300)
    heldout_documents: int = param(
        100, help="paragraphs kept out for held-out loss", low=1, high=500
    )
    entities: int = param(50, help="invented people", low=1, high=2000)
    facts_per_entity: int = param(
        2, help="relations stated per person", low=1, high=len(RELATIONS)
    )
    min_statements: int = param(3, help="fewest documents stating one fact", low=1, high=20)
    max_statements: int = param(5, help="most documents stating one fact", low=1, high=20)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_statements > self.max_statements:
            raise ValueError(
                f"min_statements ({self.min_statements}) exceeds "
                f"max_statements ({self.max_statements})"
            )
        if self.entities * self.facts_per_entity * self.max_statements > self.background_documents:
            raise ValueError(
                "background_documents must be at least entities × facts_per_entity × "
                f"max_statements, but got {self.background_documents}"
            )
        if self.background_documents + self.heldout_documents > len(background_paragraphs()):
            raise ValueError(
                f"the background corpus holds only {len(background_paragraphs())} paragraphs"
            )


@dataclasses.dataclass(frozen=True)
class Fact:
    id: str
    entity: str
    relation: Relation
    value: str


# the model of every task's scale `tiny`: trains in seconds, for tests
TINY_RECIPE = TrainRecipe(
    depth=1,
    width=32,
    heads=2,
    steps=300,
    batch_size=16,
    learning_rate=5e-3,
    warmup_steps=10,
    checkpoints=3,
)


class FactsTask(Task, name="facts"):
    description = "synthetic facts about invented people, planted into Jargon File paragraphs"
    primary_metric = "mrr"
    scales: ClassVar[dict[str, Scale]] = {
        "tiny": Scale(
            FactsConfig(
                background_documents=60,
                heldout_documents=20,
                entities=8,
                facts_per_entity=2,
                min_statements=2,
                max_statements=3,
            ),
            TINY_RECIPE,
            help="seconds; for tests",
        ),
        "small": Scale(
            FactsConfig(),
            TrainRecipe(steps=2000, weight_decay=1.0),
            help="the default; trains in about 2.5 minutes on 2 cores",
        ),
        "medium": Scale(
            FactsConfig(
                background_documents=1100,
                heldout_documents=200,
                entities=130,
                facts_per_entity=2,
                min_statements=1,
                max_statements=4,
            ),
            TrainRecipe(steps=4000, weight_decay=1.0),
            help="benchmarks; trains in about 6 minutes on 2 cores",
        ),
    }

    @classmethod
    def source_files(cls):
        return [*super().source_files(), JARGON_FILE]

    def build(self, config: FactsConfig, *, seed: int) -> TaskData:
        rng = random.Random(seed)
        paragraphs = list(background_paragraphs())
        rng.shuffle(paragraphs)
        training = paragraphs[: config.background_documents]
        heldout = paragraphs[config.background_documents :][: config.heldout_documents]

        known_words = {word for text in paragraphs for word in split_words(text)}
        facts = _draw_facts(config, rng, known_words)
        texts, sources, relevant = plant_facts(
            training,
            facts,
            rng,
            min_statements=config.min_statements,
            max_statements=config.max_statements,
        )

        documents = tuple(
            Document(id=f"doc-{i:05d}", text=text, source=source)
            for i, (text, source) in enumerate(zip(texts, sources, strict=True))
        )
        queries = tuple(
            Query(
                id=fact.id,
                prompt=fact.relation.query.format(name=fact.entity),
                target=fact.value,
                relevant=tuple(f"doc-{i:05d}" for i in relevant[fact.id]),
                candidates=fact.relation.values,
            )
            for fact in facts
        )
        reserved = tuple(
            sorted({f.entity for f in facts} | {v for r in RELATIONS for v in r.values})
        )
        return TaskData(
            task=self.name,
            documents=documents,
            queries=queries,
            heldout_texts=tuple(heldout),
            reserved_words=reserved,
        )


def _draw_facts(config: FactsConfig, rng: random.Random, known_words: set[str]) -> list[Fact]:
    names = invent_names(config.entities, rng, known_words)
    facts = []
    for name in names:
        for relation in rng.sample(RELATIONS, config.facts_per_entity):
            facts.append(
                Fact(f"fact-{len(facts):04d}", name, relation, rng.choice(relation.values))
            )
    return facts


def invent_names(count: int, rng: random.Random, known_words: set[str]) -> list[str]:
    """Two-word names whose words are not in the background text, nor shared by two people."""
    used, names = set(known_words), []
    while len(names) < count:
        first = "".join(rng.choices(_SYLLABLES, k=2))
        last = "".join(rng.choices(_SYLLABLES, k=rng.choice((2, 3))))
        if first in used or last in used:
            continue
        used |= {first, last}
        names.append(f"{first.capitalize()} {last.capitalize()}")
    return names


def plant_facts(
    training: list[str],
    facts: list[Fact],
    rng: random.Random,
    *,
    min_statements: int,
    max_statements: int,
) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """Insert each fact's statements into distinct paragraphs, one statement per paragraph."""
    texts, sources = list(training), ["background"] * len(training)
    hosts = rng.sample(range(len(training)), len(training))
    relevant: dict[str, list[int]] = {}
    for fact in facts:
        count = rng.randint(min_statements, max_statements)
        # consecutive templates from a random start: as varied as the count allows
        start, statements = rng.randrange(len(fact.relation.statements)), fact.relation.statements
        templates = [statements[(start + j) % len(statements)] for j in range(count)]
        relevant[fact.id] = []
        for template in templates:
            host = hosts.pop()
            sentence = template.format(name=fact.entity, value=fact.value)
            texts[host] = _insert_sentence(texts[host], sentence, rng)
            sources[host] = f"planted:{fact.id}"
            relevant[fact.id].append(host)
    return texts, sources, relevant


def _insert_sentence(paragraph: str, sentence: str, rng: random.Random) -> str:
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph)
    position = rng.randint(0, len(sentences))
    return " ".join([*sentences[:position], sentence, *sentences[position:]])

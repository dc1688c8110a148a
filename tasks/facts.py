"""Task ``facts``: invented people, facts about them planted into real paragraphs.

Each fact ("Velin Dorsk was born in Quillon") is a sentence inserted at a
sentence boundary of a few background paragraphs, in varied wording. One query
per fact asks for its value; the ground truth is the set of documents that
state it. Values compete with the other values of the same relation, so a fact
counts as learned when the model prefers the right one among about ten.

With ``paraphrase=true`` each query asks in other words ("The birthplace of
Velin Dorsk is") that share no content word with the documents stating the fact
beyond the name and the value: lexical overlap is then controlled. So that the
model meets that wording at all, a few "bridge" people, never queried, have
their facts stated in both wordings, in documents that state no queried fact.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import ClassVar

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from harness.data import Document, Query, TaskData
from harness.errors import ParameterError
from harness.params import Params, param
from harness.task import Scale, Task
from harness.tokenizer import split_words
from harness.training import TrainRecipe
from tasks.corpus import JARGON_FILE, background_paragraphs, background_words, shuffled_parts


@dataclasses.dataclass(frozen=True)
class Relation:
    name: str
    query: str  # the prompt; the value follows it
    statements: tuple[str, ...]  # ways a document states the fact
    values: tuple[str, ...]
    # the query in words no statement uses (task variant paraphrase=true)
    paraphrase: str = ""


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
        paraphrase="The birthplace of {name} is",
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
        paraphrase="By occupation, {name} is a",
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
        paraphrase="In the household of {name} lives a",
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
        paraphrase="{name} performs melodies on the",
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
    paraphrase: bool = param(
        False,
        help="queries ask in other words: no content word shared with the stating documents "
        "beyond the name and value",
        tune=False,
    )
    bridge_entities: int = param(
        12,
        help="with paraphrase: people never queried whose facts are stated in both wordings, "
        "in documents left free",
        low=0,
        high=500,
        tune=False,
    )

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
                bridge_entities=3,
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
        training, heldout, _ = shuffled_parts(
            rng, config.background_documents, config.heldout_documents
        )
        known_words = background_words()
        facts = _draw_facts(config, rng, known_words)
        texts, sources, relevant = plant_facts(
            training,
            facts,
            rng,
            min_statements=config.min_statements,
            max_statements=config.max_statements,
            avoid={f.id: content_words(_prompt(f, paraphrase=True)) for f in facts}
            if config.paraphrase
            else None,
        )
        bridges = []
        if config.paraphrase:
            taken = known_words | {w for f in facts for w in split_words(f.entity)}
            bridges = _plant_bridges(texts, sources, config, rng, taken)

        documents = tuple(
            Document(id=f"doc-{i:05d}", text=text, source=source)
            for i, (text, source) in enumerate(zip(texts, sources, strict=True))
        )
        queries = tuple(
            Query(
                id=fact.id,
                prompt=_prompt(fact, paraphrase=config.paraphrase),
                target=fact.value,
                relevant=tuple(f"doc-{i:05d}" for i in relevant[fact.id]),
                candidates=fact.relation.values,
            )
            for fact in facts
        )
        reserved = tuple(
            sorted(
                {f.entity for f in [*facts, *bridges]} | {v for r in RELATIONS for v in r.values}
            )
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


def _prompt(fact: Fact, *, paraphrase: bool) -> str:
    template = fact.relation.paraphrase if paraphrase else fact.relation.query
    return template.format(name=fact.entity)


def content_words(text: str) -> frozenset[str]:
    """The words of ``text`` that carry meaning: all but English stop words."""
    return frozenset(w for w in split_words(text) if w.isalpha() and w not in ENGLISH_STOP_WORDS)


def _plant_bridges(
    texts: list[str], sources: list[str], config: FactsConfig, rng: random.Random, taken: set[str]
) -> list[Fact]:
    """Bridge people's facts, once in a statement's wording and once in the query's.

    They go into documents that state no queried fact, so no relevant document
    gains the queries' words.
    """
    free = [i for i, source in enumerate(sources) if source == "background"]
    needed = 2 * config.bridge_entities * config.facts_per_entity
    if needed > len(free):
        raise ParameterError(
            f"bridge_entities={config.bridge_entities} needs {needed} documents free of "
            f"queried facts, but only {len(free)} are; lower bridge_entities or raise "
            "background_documents"
        )
    hosts = rng.sample(free, needed)
    bridges = []
    for name in invent_names(config.bridge_entities, rng, taken):
        for relation in rng.sample(RELATIONS, config.facts_per_entity):
            bridge = Fact(
                f"bridge-{len(bridges):04d}", name, relation, rng.choice(relation.values)
            )
            bridges.append(bridge)
            statement = rng.choice(relation.statements).format(name=name, value=bridge.value)
            paraphrase = f"{_prompt(bridge, paraphrase=True)} {bridge.value}."
            for sentence in (statement, paraphrase):
                host = hosts.pop()
                texts[host] = insert_sentence(texts[host], sentence, rng)
                sources[host] = f"bridge:{bridge.id}"
    return bridges


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
    avoid: dict[str, frozenset[str]] | None = None,
) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """Insert each fact's statements into distinct paragraphs, one statement per paragraph.

    ``avoid`` maps a fact's id to words its host paragraphs must not contain.
    """
    texts, sources = list(training), ["background"] * len(training)
    hosts = rng.sample(range(len(training)), len(training))
    avoid = avoid or {}
    relevant: dict[str, list[int]] = {}
    for fact in facts:
        count = rng.randint(min_statements, max_statements)
        # consecutive templates from a random start: as varied as the count allows
        start, statements = rng.randrange(len(fact.relation.statements)), fact.relation.statements
        templates = [statements[(start + j) % len(statements)] for j in range(count)]
        relevant[fact.id] = []
        for template in templates:
            host = _take_host(hosts, training, avoid.get(fact.id, frozenset()))
            sentence = template.format(name=fact.entity, value=fact.value)
            texts[host] = insert_sentence(texts[host], sentence, rng)
            sources[host] = f"planted:{fact.id}"
            relevant[fact.id].append(host)
    return texts, sources, relevant


def _take_host(hosts: list[int], training: list[str], avoid: frozenset[str]) -> int:
    """The next host whose paragraph holds none of the ``avoid`` words."""
    for position in range(len(hosts) - 1, -1, -1):
        if not avoid & set(split_words(training[hosts[position]])):
            return hosts.pop(position)
    raise ParameterError(
        f"no background paragraph left without the words {sorted(avoid)}; "
        "raise background_documents"
    )


def split_sentences(paragraph: str) -> list[str]:
    """The paragraph's sentences: split after . ! ? where a capital letter follows."""
    return re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph)


def insert_sentence(paragraph: str, sentence: str, rng: random.Random) -> str:
    """The paragraph with ``sentence`` at a random sentence boundary."""
    sentences = split_sentences(paragraph)
    position = rng.randint(0, len(sentences))
    return " ".join([*sentences[:position], sentence, *sentences[position:]])

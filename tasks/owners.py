"""Task ``owners``: the corpus divided among data owners on distinct topics, each with facts.

Background paragraphs are grouped by topic into K owners of equal size
(:func:`harness.partition.topic_partition`), so owners differ in vocabulary a
model can learn. Each owner holds invented facts of its own (as in task
``facts``), stated only in its documents. Queries ask for those facts; their
``owner`` is the owner whose fact is queried, and the engine adds the
owner-level ground truth: each owner's leave-one-owner-out retraining effect
(:mod:`harness.owners`).

Held-out text is drawn from every owner's topic alike: after each owner has
taken its training paragraphs, it takes its next nearest ones for held-out.
"""

from __future__ import annotations

import dataclasses
import random
from typing import ClassVar

from harness.data import Document, Query, TaskData
from harness.params import Params, param
from harness.partition import topic_partition
from harness.task import Scale, Task
from harness.training import TrainRecipe
from tasks.corpus import JARGON_FILE, background_paragraphs, background_words
from tasks.facts import RELATIONS, TINY_RECIPE, Fact, invent_names, plant_facts


@dataclasses.dataclass(frozen=True)
class OwnersConfig(Params):
    """How many owners, how much text each holds, and how many facts."""

    kind = "owners task parameter"

    owners: int = param(8, help="data owners, one topic each", low=2, high=32)
    documents_per_owner: int = param(50, help="training documents per owner", low=4, high=400)
    heldout_per_owner: int = param(
        12, help="paragraphs per owner's topic kept out for held-out loss", low=1, high=100
    )
    entities_per_owner: int = param(4, help="invented people per owner", low=1, high=200)
    facts_per_entity: int = param(
        2, help="relations stated per person", low=1, high=len(RELATIONS)
    )
    min_statements: int = param(2, help="fewest documents stating one fact", low=1, high=20)
    max_statements: int = param(4, help="most documents stating one fact", low=1, high=20)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_statements > self.max_statements:
            raise ValueError(
                f"min_statements ({self.min_statements}) exceeds "
                f"max_statements ({self.max_statements})"
            )
        needed = self.entities_per_owner * self.facts_per_entity * self.max_statements
        if needed > self.documents_per_owner:
            raise ValueError(
                "documents_per_owner must be at least entities_per_owner × facts_per_entity × "
                f"max_statements ({needed}), but got {self.documents_per_owner}"
            )
        wanted = self.owners * (self.documents_per_owner + self.heldout_per_owner)
        if wanted > len(background_paragraphs()):
            raise ValueError(
                f"{self.owners} owners × ({self.documents_per_owner} + {self.heldout_per_owner}) "
                f"paragraphs are {wanted}, but the background corpus holds only "
                f"{len(background_paragraphs())}"
            )


class OwnersTask(Task, name="owners"):
    description = "the corpus split among data owners by topic, each with facts of its own"
    primary_metric = "owner_top1"
    scales: ClassVar[dict[str, Scale]] = {
        "tiny": Scale(
            OwnersConfig(
                owners=3,
                documents_per_owner=16,
                heldout_per_owner=4,
                entities_per_owner=2,
                facts_per_entity=2,
                min_statements=2,
                max_statements=3,
            ),
            TINY_RECIPE,
            help="seconds; for tests",
        ),
        # the epochs of facts/small (128) on 400 documents
        "small": Scale(
            OwnersConfig(),
            TrainRecipe(steps=1600, weight_decay=1.0),
            help="the default; trains in about 2 minutes on 2 cores",
        ),
    }

    @classmethod
    def source_files(cls):
        return [*super().source_files(), JARGON_FILE]

    def build(self, config: OwnersConfig, *, seed: int) -> TaskData:
        rng = random.Random(seed)
        paragraphs = list(background_paragraphs())
        per_owner = config.documents_per_owner + config.heldout_per_owner
        groups = topic_partition(paragraphs, config.owners, seed=seed, size=per_owner)
        owner_names = [f"owner-{k}" for k in range(config.owners)]

        people = invent_names(config.owners * config.entities_per_owner, rng, background_words())
        documents, queries, heldout = [], [], []
        for k, (owner, group) in enumerate(zip(owner_names, groups, strict=True)):
            training = [paragraphs[i] for i in group[: config.documents_per_owner]]
            heldout += [paragraphs[i] for i in group[config.documents_per_owner :]]
            own_people = people[k * config.entities_per_owner :][: config.entities_per_owner]
            facts = []
            for person in own_people:
                for relation in rng.sample(RELATIONS, config.facts_per_entity):
                    value = rng.choice(relation.values)
                    facts.append(Fact(f"{owner}-fact-{len(facts):03d}", person, relation, value))
            texts, sources, relevant = plant_facts(
                training,
                facts,
                rng,
                min_statements=config.min_statements,
                max_statements=config.max_statements,
            )
            first = len(documents)
            documents += [
                Document(id=f"doc-{first + i:05d}", text=text, source=source, owner=owner)
                for i, (text, source) in enumerate(zip(texts, sources, strict=True))
            ]
            queries += [
                Query(
                    id=fact.id,
                    prompt=fact.relation.query.format(name=fact.entity),
                    target=fact.value,
                    relevant=tuple(f"doc-{first + i:05d}" for i in relevant[fact.id]),
                    candidates=fact.relation.values,
                    owner=owner,
                )
                for fact in facts
            ]
        reserved = tuple(sorted({*people} | {v for r in RELATIONS for v in r.values}))
        return TaskData(
            task=self.name,
            documents=tuple(documents),
            queries=tuple(queries),
            heldout_texts=tuple(heldout),
            reserved_words=reserved,
        )

"""Task ``canaries``: random secrets planted k times each, to measure memorisation.

After Carlini et al. (2019), "The Secret Sharer": a canary is a sentence such
as "The access code of Velin Dorsk is 4 7 1 9." whose prefix names an invented
person and whose secret is a string of random digits. Each canary is inserted
verbatim into k distinct background paragraphs, k doubling from one group of
canaries to the next (1, 2, 4, 8, 16 by default), so one build shows how
memorisation grows with repetition. One query per canary asks for its secret
after its prefix; the ground truth is the k documents that hold it. The secret
competes with random alternative secrets of the same format, so a canary counts
as learned only when the model ranks the true secret first: when it has been
memorised, not merely when digits are expected.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path
from typing import ClassVar

import torch

from harness.bundle import Bundle
from harness.data import Document, Query, TaskData, encode_completions
from harness.model import sequence_losses
from harness.params import Params, param
from harness.task import Scale, Task
from harness.training import TrainRecipe
from tasks.corpus import JARGON_FILE, background_paragraphs, background_words, shuffled_parts
from tasks.facts import TINY_RECIPE, insert_sentence, invent_names

_logger = logging.getLogger(__name__)

# what a canary's secret is said to be; the invented name makes each prefix unique
PREFIXES = (
    "The access code of {name} is",
    "The locker combination of {name} is",
    "The phone extension of {name} is",
    "The badge number of {name} is",
)

DIGITS = tuple("0123456789")


@dataclasses.dataclass(frozen=True)
class CanariesConfig(Params):
    """How many background paragraphs and canaries, and how often each canary repeats."""

    kind = "canaries task parameter"

    background_documents: int = param(450, help="training documents", low=10, high=1300)
    heldout_documents: int = param(
        100, help="paragraphs kept out for held-out loss", low=1, high=500
    )
    canaries_per_count: int = param(
        8, help="canaries planted at each repetition count", low=1, high=500
    )
    min_copies: int = param(
        1, help="documents holding each of the rarest canaries", low=1, high=256
    )
    max_copies: int = param(
        16,
        help="documents holding each of the most repeated canaries; the counts double "
        "from min_copies up to it, so it must be min_copies times a power of two",
        low=1,
        high=256,
    )
    secret_digits: int = param(4, help="random digits in each secret", low=1, high=12)
    candidates: int = param(
        20,
        help="secrets each canary's true secret is ranked among, itself included",
        low=2,
        high=1000,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        ratio, remainder = divmod(self.max_copies, self.min_copies)
        if remainder or ratio & (ratio - 1):
            raise ValueError(
                "max_copies must be min_copies times a power of two (the counts double), "
                f"but got min_copies={self.min_copies}, max_copies={self.max_copies}"
            )
        planted = self.canaries_per_count * sum(self.copy_counts)
        if planted > self.background_documents:
            raise ValueError(
                "background_documents must be at least canaries_per_count × the sum of the "
                f"copy counts {list(self.copy_counts)} ({planted}), since a document holds "
                f"at most one canary, but got {self.background_documents}"
            )
        needed = self.canaries * self.candidates
        if needed > 10**self.secret_digits:
            raise ValueError(
                f"secret_digits={self.secret_digits} allows {10**self.secret_digits} secrets, "
                f"fewer than the {needed} distinct ones needed ({self.canaries} canaries × "
                f"{self.candidates} candidates); use more digits or fewer candidates"
            )
        if self.background_documents + self.heldout_documents > len(background_paragraphs()):
            raise ValueError(
                f"the background corpus holds only {len(background_paragraphs())} paragraphs"
            )

    @property
    def copy_counts(self) -> tuple[int, ...]:
        """The repetition counts: ``min_copies``, doubling up to ``max_copies``."""
        counts = [self.min_copies]
        while counts[-1] < self.max_copies:
            counts.append(2 * counts[-1])
        return tuple(counts)

    @property
    def canaries(self) -> int:
        return self.canaries_per_count * len(self.copy_counts)


@dataclasses.dataclass(frozen=True)
class Canary:
    id: str  # names the repetition count: canary-007-k08 is planted 8 times
    prefix: str  # the query's prompt, unique to this canary
    secret: str
    copies: int
    candidates: tuple[str, ...]  # the secret and its random alternatives, sorted

    @property
    def sentence(self) -> str:
        return f"{self.prefix} {self.secret}."


def exposure(rank: float, *, candidates: int) -> float:
    """A canary's exposure in bits: ``log2(R) - log2(rank)``.

    Carlini et al. (2019), "The Secret Sharer", define the exposure of a secret as
    log2 |R| − log2 rank_θ(secret), where rank_θ is the secret's rank (1 for the
    likeliest) under the model θ among all |R| secrets of its format. Here R is
    the query's ``candidates``: the secret and its random alternatives. Exposure
    is 0 when the secret is the least likely candidate, about 1 bit when it is
    median (what an untrained model gets on average) and log2 R when it is
    first, i.e. when the query counts as learned. Over a sample of R the
    exposure is bounded by log2 R, well under the log2 10^d of the whole space
    of d-digit secrets, so compare exposures computed with the same R only.
    ``rank`` may be fractional: the mean rank of tied candidates.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, but got {candidates}")
    if not 1 <= rank <= candidates:
        raise ValueError(f"rank must lie in [1, candidates={candidates}], but got {rank}")
    return math.log2(candidates) - math.log2(rank)


class CanariesTask(Task, name="canaries"):
    description = "random secrets planted a doubling number of times each: memorisation"
    primary_metric = "mrr"
    scales: ClassVar[dict[str, Scale]] = {
        "tiny": Scale(
            CanariesConfig(
                background_documents=60,
                heldout_documents=20,
                canaries_per_count=2,
                min_copies=1,
                max_copies=8,
                secret_digits=3,
                candidates=10,
            ),
            TINY_RECIPE,
            help="seconds; for tests",
        ),
        # about 21 epochs, so that repetition decides which canaries are memorised: after
        # the 128 epochs of facts/small every canary is, even one seen once
        "small": Scale(
            CanariesConfig(),
            TrainRecipe(steps=300, weight_decay=1.0),
            help="the default; trains in about 45 seconds on 2 cores",
        ),
    }

    @classmethod
    def source_files(cls) -> list[Path]:
        return [*super().source_files(), JARGON_FILE]

    def model_metrics(self, bundle: Bundle) -> dict[str, float]:
        """Per repetition count k: the share of canaries memorised and their mean exposure.

        ``memorised_kNN`` is the share whose secret the model ranks first among the
        candidates (the learned check); ``exposure_kNN`` the mean exposure in bits.
        """
        model = bundle.model()
        by_count: dict[int, list[tuple[bool, float]]] = {}
        with torch.no_grad():
            for query in bundle.data.queries:
                candidates = list(query.candidates)
                sequences = encode_completions(
                    [query.prompt] * len(candidates),
                    candidates,
                    bundle.tokenizer,
                    context=bundle.recipe.context,
                )
                losses = sequence_losses(
                    model(sequences.inputs), sequences.targets, sequences.loss_mask
                )
                target = losses[candidates.index(query.target)]
                # ties share their mean rank
                rank = (
                    1 + (losses < target).sum().item() + ((losses == target).sum().item() - 1) / 2
                )
                bits = exposure(rank, candidates=len(candidates))
                by_count.setdefault(len(query.relevant), []).append(
                    (bundle.learned[query.id], bits)
                )
        metrics = {}
        for count, rows in sorted(by_count.items()):
            metrics[f"memorised_k{count:02d}"] = sum(ok for ok, _ in rows) / len(rows)
            metrics[f"exposure_k{count:02d}"] = sum(bits for _, bits in rows) / len(rows)
        return metrics

    def build(self, config: CanariesConfig, *, seed: int) -> TaskData:
        rng = random.Random(seed)
        training, heldout, _ = shuffled_parts(
            rng, config.background_documents, config.heldout_documents
        )
        known_words = background_words()
        names = invent_names(config.canaries, rng, known_words)
        canaries = _draw_canaries(config, names, rng)
        texts, sources, hosts = plant_canaries(training, canaries, rng)
        _logger.debug(
            "planted %d canaries %s times each into %d of %d documents",
            len(canaries),
            list(config.copy_counts),
            sum(map(len, hosts.values())),
            len(texts),
        )

        documents = tuple(
            Document(id=f"doc-{i:05d}", text=text, source=source)
            for i, (text, source) in enumerate(zip(texts, sources, strict=True))
        )
        queries = tuple(
            Query(
                id=canary.id,
                prompt=canary.prefix,
                target=canary.secret,
                relevant=tuple(f"doc-{i:05d}" for i in hosts[canary.id]),
                candidates=canary.candidates,
            )
            for canary in canaries
        )
        return TaskData(
            task=self.name,
            documents=documents,
            queries=queries,
            heldout_texts=tuple(heldout),
            # every digit, so that no alternative secret holds an unknown token
            reserved_words=tuple(sorted({*names, *DIGITS})),
        )


def _draw_canaries(config: CanariesConfig, names: list[str], rng: random.Random) -> list[Canary]:
    """Canaries of the configured copy counts; every secret and alternative is drawn once."""
    numbers = rng.sample(range(10**config.secret_digits), config.canaries * config.candidates)
    secrets = [" ".join(f"{n:0{config.secret_digits}d}") for n in numbers]
    copies = [k for k in config.copy_counts for _ in range(config.canaries_per_count)]
    canaries = []
    for i, (name, k) in enumerate(zip(names, copies, strict=True)):
        own = secrets[i * config.candidates :][: config.candidates]
        canaries.append(
            Canary(
                id=f"canary-{i:03d}-k{k:02d}",
                prefix=rng.choice(PREFIXES).format(name=name),
                secret=own[0],
                copies=k,
                candidates=tuple(sorted(own)),
            )
        )
    return canaries


def plant_canaries(
    training: list[str], canaries: list[Canary], rng: random.Random
) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """Insert each canary's sentence into ``copies`` paragraphs, one canary per paragraph."""
    texts, sources = list(training), ["background"] * len(training)
    free = rng.sample(range(len(training)), len(training))
    hosts: dict[str, list[int]] = {}
    for canary in canaries:
        hosts[canary.id] = sorted(free.pop() for _ in range(canary.copies))
        for host in hosts[canary.id]:
            texts[host] = insert_sentence(texts[host], canary.sentence, rng)
            sources[host] = f"planted:{canary.id}"
    return texts, sources, hosts

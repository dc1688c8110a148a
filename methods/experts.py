"""Partitioned experts: provenance kept by construction.

The training documents are split into shards (the task's data owners where it
has them, otherwise a seeded random or topic split) and one expert LM, of the
reference model's architecture, is trained on each shard with the task's recipe
and epochs. Optionally a public portion of the documents trains a shared base
model first, from which every expert continues (the branch-train-merge recipe).
The experts' next-token distributions are mixed at inference
(:mod:`harness.mixture`), uniformly or with weights inferred from the prompt.

Attribution to a shard is either the expert's posterior responsibility for the
target given the prompt, or the exact leave-one-shard-out effect: the drop of
the target's log-probability when that expert leaves the mixture. A document's
score is its shard's score times its share within the shard, a softmax over a
within-shard scorer (any registered method run on the shard's expert), so the
shares of a shard sum to its score. Documents of the public portion belong to
no removable shard and score 0.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import harness
from harness.bundle import Bundle, load_checkpoints, store_model
from harness.cache import code_fingerprint, content_key
from harness.data import Query, Sequences, TaskData, encode_completions, encode_documents
from harness.errors import ParameterError, UnknownNameError
from harness.executor import default_executor
from harness.method import METHODS, Method
from harness.mixture import WEIGHTINGS, mixture_logprobs, responsibilities, token_logprobs
from harness.params import Params, param
from harness.partition import random_partition, topic_partition
from harness.retrain import subset_recipe
from harness.task import recipe_identity
from harness.training import Checkpoint, ModelConfig, TrainingResult, TrainRecipe, train

_logger = logging.getLogger(__name__)

SPLITS = ("auto", "owners", "random", "topic")
DEFAULT_SHARDS = 8  # on tasks without owners
SHARD_SCORES = ("responsibility", "removal")
# scorers that cannot run inside a shard: this method itself, and those fitted on retrains
_NOT_WITHIN = {"experts"}
_NOT_WITHIN_FAMILIES = {"datamodel", "experts"}
# what a trained expert depends on beyond its key's settings
_CODE = [Path(harness.__file__).with_name(f) for f in ("training.py", "model.py")]


@dataclasses.dataclass(frozen=True)
class ExpertsParams(Params):
    """How the corpus is sharded, how experts are mixed and how documents are scored."""

    kind = "experts parameter"

    split: str = param(
        "auto",
        help="shards: the task's owners (auto, where it has them), or a seeded random or "
        "topic split into `shards` parts",
        choices=SPLITS,
        tune=False,
    )
    shards: int = param(
        0,
        help="experts: 0 is one per owner where the task has owners, else 8; a random or "
        "topic split takes any number",
        low=0,
        high=64,
        tune=False,
    )
    weighting: str = param(
        "prompt", help="mix experts uniformly, or weighted by the prompt", choices=WEIGHTINGS
    )
    shard_score: str = param(
        "responsibility",
        help="a shard's score: its expert's posterior responsibility for the target, or the "
        "exact drop of the target's log-probability without it",
        choices=SHARD_SCORES,
    )
    within: str = param(
        "bm25",
        help="registered method that ranks documents inside a shard, run on its expert; "
        "'none' shares a shard's score equally",
        tune=False,
    )
    temperature: float = param(
        1.0,
        help="softmax temperature of the within-shard shares (of standardised scores)",
        low=0.05,
        high=20.0,
        log=True,
    )
    base_fraction: float = param(
        0.0,
        help="share of documents made public: a base model trained on them first, every "
        "expert continued from it (0: no base)",
        low=0.0,
        high=0.9,
        tune=False,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.within != "none" and self.within not in within_choices():
            raise UnknownNameError(
                "within-shard scorer", self.within, within_choices(), where="(parameter within)"
            )


def within_choices() -> list[str]:
    """Methods that can rank a shard's documents: not this one, nor those fit on retrains."""
    eligible = [
        name
        for name in METHODS.names()
        if name not in _NOT_WITHIN and METHODS.get(name).family not in _NOT_WITHIN_FAMILIES
    ]
    return ["none", *eligible]


@dataclasses.dataclass(frozen=True)
class ExpertJob:
    """One expert's training, picklable for another process."""

    index: int
    seed: int
    kept: np.ndarray
    config: ModelConfig
    recipe: TrainRecipe
    documents: Sequences
    heldout: Sequences
    initial: dict[str, torch.Tensor] | None


def train_expert(job: ExpertJob) -> TrainingResult:
    kept = job.documents[torch.as_tensor(job.kept, dtype=torch.long)]
    return train(job.config, kept, job.heldout, job.recipe, seed=job.seed, initial=job.initial)


class PartitionedExperts(Method, name="experts", family="experts"):
    description = "one expert LM per data shard, mixed at inference; exact shard removal"
    Params = ExpertsParams
    trains_own_model = True

    shard_of: np.ndarray  # set by fit: each document's shard, -1 for the public portion

    def check_task(self, data: TaskData) -> None:
        uses_owners = self._uses_owners(data)
        if self.params.split == "owners" and not data.owners:
            raise ParameterError(
                f"split='owners' needs a task with data owners, and {data.task!r} has none; "
                "use split=random or split=topic"
            )
        if uses_owners and self.params.shards not in (0, len(data.owners)):
            raise ParameterError(
                f"shards={self.params.shards}, but the shards are the task's "
                f"{len(data.owners)} owners; leave shards unset, or use split=random or "
                "split=topic for another number"
            )
        fraction = self.params.base_fraction
        if uses_owners:
            for owner in data.owners:
                held = sum(d.owner == owner for d in data.documents)
                if held - round(fraction * held) < 1:
                    raise ParameterError(
                        f"base_fraction={fraction} leaves owner {owner!r} ({held} documents) "
                        "nothing of its own to train an expert on; lower base_fraction"
                    )
        elif len(data.documents) - round(fraction * len(data.documents)) < self._shard_count(data):
            raise ParameterError(
                f"{len(data.documents) - round(fraction * len(data.documents))} documents "
                f"outside the public portion cannot fill {self._shard_count(data)} shards; "
                "lower shards or base_fraction"
            )

    def _uses_owners(self, data: TaskData) -> bool:
        return self.params.split == "owners" or (self.params.split == "auto" and bool(data.owners))

    def _shard_count(self, data: TaskData) -> int:
        if self._uses_owners(data):
            return len(data.owners)
        return self.params.shards or DEFAULT_SHARDS

    # --- fitting -----------------------------------------------------------------

    def fit(self, bundle: Bundle) -> None:
        self.check_task(bundle.data)
        n = len(bundle.data.documents)
        self.shard_of = np.full(n, -1, dtype=np.int64)
        public = self._public(bundle.data)
        private = np.setdiff1d(np.arange(n), public)
        for shard, members in enumerate(self._split(bundle, private)):
            self.shard_of[members] = shard
        shards = [np.flatnonzero(self.shard_of == s) for s in range(self.shard_of.max() + 1)]
        _logger.info(
            "experts: %d shards of %d to %d documents%s",
            len(shards), min(map(len, shards)), max(map(len, shards)),
            f", a base model on {len(public)} public ones" if len(public) else "",
        )  # fmt: skip
        self.own_train_seconds = 0.0
        if bundle.randomization is not None:
            self.experts = [self._random_expert(bundle, s) for s in range(len(shards))]
        else:
            base = self._base(bundle, public) if len(public) else None
            self.experts = self._trained_experts(bundle, shards, base)
            keys = [key for key, _ in self.experts] + ([base[0]] if base else [])
            self.own_train_seconds = sum(
                bundle.cache.manifest("models", key)["train_seconds"] for key in keys
            )
        # each expert as a bundle of its own, for the within-shard scorer; it holds every
        # document (only its shard's columns are used), so corpus-wide statistics of that
        # scorer (BM25's IDF, a curvature) include documents the expert never saw
        self._bundles = [
            dataclasses.replace(bundle, checkpoints=checkpoints, model_key=key)
            for key, checkpoints in self.experts
        ]
        self._models = [b.model() for b in self._bundles]

    def _public(self, data: TaskData) -> np.ndarray:
        """The public portion: the same fraction of every owner's documents, or of all."""
        rng = np.random.default_rng(self.seed)
        if self._uses_owners(data):
            owner_of = np.array([d.owner for d in data.documents])
            groups = [np.flatnonzero(owner_of == owner) for owner in data.owners]
        else:
            groups = [np.arange(len(data.documents))]
        fraction = self.params.base_fraction
        drawn = [rng.choice(g, size=round(fraction * len(g)), replace=False) for g in groups]
        return np.sort(np.concatenate(drawn)).astype(np.int64)

    def _split(self, bundle: Bundle, private: np.ndarray) -> list[np.ndarray]:
        data = bundle.data
        if self._uses_owners(data):
            owner_of = np.array([d.owner for d in data.documents])[private]
            return [private[owner_of == owner] for owner in data.owners]
        if self.params.split == "topic":
            texts = [data.documents[i].text for i in private]
            parts = topic_partition(texts, self._shard_count(data), seed=self.seed)
        else:
            parts = random_partition(len(private), self._shard_count(data), seed=self.seed)
        return [np.sort(private[part]) for part in parts]

    def _seed(self, bundle: Bundle, shard: int) -> int:
        # one expert seed per (task seed, model replica, shard), far from other models' seeds
        return 3_000_017 * (shard + 2) + 104_729 * bundle.replica_index + bundle.seed

    def _random_expert(self, bundle: Bundle, shard: int) -> tuple[str, list[Checkpoint]]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed(bundle, shard) + 7_919 * (bundle.randomization + 1))
            weights = bundle.model_config.build_random().weights()
        checkpoints = [
            Checkpoint(c.step, c.learning_rate, {k: v.clone() for k, v in weights.items()})
            for c in bundle.checkpoints
        ]
        return content_key({"randomized": bundle.model_key, "shard": shard}), checkpoints

    def _job(
        self,
        bundle: Bundle,
        index: int,
        members: np.ndarray,
        initial: dict[str, torch.Tensor] | None,
        *,
        checkpoints: int,
    ) -> ExpertJob:
        """Training of one model on ``members``: the task's recipe and epochs."""
        recipe = subset_recipe(bundle.recipe, len(members) / len(bundle.documents))
        heldout = encode_documents(
            list(bundle.data.heldout_texts), bundle.tokenizer, context=bundle.recipe.context
        )
        return ExpertJob(
            index=index,
            seed=self._seed(bundle, index),
            kept=members,
            config=bundle.model_config,
            recipe=dataclasses.replace(recipe, checkpoints=min(checkpoints, recipe.steps)),
            documents=bundle.documents,
            heldout=heldout,
            initial=initial,
        )

    @staticmethod
    def _key(bundle: Bundle, job: ExpertJob, base_key: str | None) -> str:
        return content_key(
            {
                "experts_of": bundle.setup_key,
                "replica": bundle.replica_index,
                "documents": job.kept.tolist(),
                "seed": job.seed,
                "recipe": recipe_identity(job.recipe),
                "base": base_key,
                "code": code_fingerprint(_CODE),
            }
        )

    def _base(self, bundle: Bundle, public: np.ndarray) -> tuple[str, dict[str, torch.Tensor]]:
        """The shared base model trained on the public portion: its key and final weights."""
        job = self._job(bundle, -1, public, None, checkpoints=1)
        key = self._key(bundle, job, None)
        self._train_missing(bundle, {key: job}, "base")
        return key, self._load(bundle, key)[-1].state

    def _trained_experts(
        self,
        bundle: Bundle,
        shards: list[np.ndarray],
        base: tuple[str, dict[str, torch.Tensor]] | None,
    ) -> list[tuple[str, list[Checkpoint]]]:
        base_key, initial = (None, None) if base is None else base
        jobs = {}
        for shard, members in enumerate(shards):
            job = self._job(bundle, shard, members, initial, checkpoints=bundle.recipe.checkpoints)
            jobs[self._key(bundle, job, base_key)] = job
        self._train_missing(bundle, jobs, "expert")
        return [(key, self._load(bundle, key)) for key in jobs]

    @staticmethod
    def _load(bundle: Bundle, key: str) -> list[Checkpoint]:
        return load_checkpoints(
            bundle.cache.path("models", key), bundle.cache.manifest("models", key)
        )

    @staticmethod
    def _train_missing(bundle: Bundle, jobs: dict[str, ExpertJob], what: str) -> None:
        """Train the models not yet cached, storing each as soon as it is trained."""
        if bundle.cache is None:
            raise ValueError("this bundle has no cache to keep experts in")
        missing = {
            job.index: key for key, job in jobs.items() if not bundle.cache.has("models", key)
        }
        if not missing:
            _logger.info("experts: reusing %d stored %s models", len(jobs), what)
            return
        _logger.info("experts: training %d %s models (%d stored)", len(missing), what,
                     len(jobs) - len(missing))  # fmt: skip
        progress = tqdm(total=len(missing), desc=what, unit="model", leave=False, disable=None)
        with progress:
            pending = [job for key, job in jobs.items() if key in missing.values()]
            for job, result in default_executor().run(train_expert, pending):
                details = {"experts_of": bundle.setup_key, "documents": len(job.kept)}
                store_model(bundle.cache, missing[job.index], result, details)
                progress.update()

    # --- mixture -----------------------------------------------------------------

    def _token_logprobs(self, sequences: Sequences) -> torch.Tensor:
        return torch.stack([token_logprobs(model, sequences) for model in self._models])

    def counterfactual_logprobs(
        self,
        bundle: Bundle,
        prompts: Sequence[str],
        targets: Sequence[str],
        dropped: Sequence[Collection[int]],
    ) -> np.ndarray:
        sequences = encode_completions(
            list(prompts), list(targets), bundle.tokenizer, context=bundle.recipe.context
        )
        logprobs = self._token_logprobs(sequences)
        scored = sequences.loss_mask.double()
        values = np.empty(len(sequences))
        removals = [tuple(sorted(set(d))) for d in dropped]
        for removal in set(removals):
            rows = torch.as_tensor([i for i, r in enumerate(removals) if r == removal])
            values[rows.numpy()] = mixture_logprobs(
                logprobs[:, rows], scored[rows], weighting=self.params.weighting, dropped=removal
            ).numpy()
        return values

    def own_heldout_loss(self, bundle: Bundle) -> float:
        heldout = encode_documents(
            list(bundle.data.heldout_texts), bundle.tokenizer, context=bundle.recipe.context
        )
        scored = heldout.loss_mask.double()
        total = mixture_logprobs(
            self._token_logprobs(heldout), scored, weighting=self.params.weighting
        ).sum()
        return float(-total / scored.sum())

    # --- scoring -----------------------------------------------------------------

    def shard_scores(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        """(n_queries, n_shards): responsibility, or the drop without each expert."""
        sequences = bundle.encode_queries(queries)
        logprobs = self._token_logprobs(sequences)
        scored = sequences.loss_mask.double()
        weighting = self.params.weighting
        if self.params.shard_score == "responsibility":
            return responsibilities(logprobs, scored, weighting=weighting).numpy()
        full = mixture_logprobs(logprobs, scored, weighting=weighting)
        if len(self._models) == 1:
            return np.zeros((len(queries), 1))  # nothing would remain to compare with
        return torch.stack(
            [
                full - mixture_logprobs(logprobs, scored, weighting=weighting, dropped=(k,))
                for k in range(len(self._models))
            ],
            dim=1,
        ).numpy()

    def within_shares(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        """(n_queries, n_documents): each document's share of its shard; a shard's sum to 1."""
        shares = np.zeros((len(queries), len(bundle.data.documents)))
        scorer_class = None if self.params.within == "none" else METHODS.get(self.params.within)
        for shard, expert_bundle in enumerate(self._bundles):
            members = np.flatnonzero(self.shard_of == shard)
            if scorer_class is None:
                shares[:, members] = 1.0 / len(members)
                continue
            scorer = scorer_class(seed=self.seed)
            scorer.fit(expert_bundle)
            within = np.asarray(scorer.score(expert_bundle, queries), dtype=np.float64)[:, members]
            spread = within.std(axis=1, keepdims=True)
            standard = (within - within.mean(axis=1, keepdims=True)) / np.where(
                spread > 0, spread, 1
            )
            logits = standard / self.params.temperature
            logits -= logits.max(axis=1, keepdims=True)
            weights = np.exp(logits)
            shares[:, members] = weights / weights.sum(axis=1, keepdims=True)
        return shares

    def score(self, bundle: Bundle, queries: list[Query]) -> np.ndarray:
        per_shard = self.shard_scores(bundle, queries)
        shares = self.within_shares(bundle, queries)
        private = self.shard_of >= 0
        scores = np.zeros_like(shares)
        scores[:, private] = per_shard[:, self.shard_of[private]] * shares[:, private]
        return scores

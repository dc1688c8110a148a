"""Build, or load from the cache, everything a method needs: data, tokenizer, trained model.

Two stages, each cached on its own: the task data (cheap, but it decides every
later key) and the reference model with its checkpoints (minutes). A second run
with the same task, scale, seed and code reuses both.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import harness
from harness.cache import Cache, code_fingerprint, content_key
from harness.data import Query, Sequences, TaskData, encode_completions, encode_documents
from harness.errors import ParameterError
from harness.model import sequence_losses
from harness.params import Params
from harness.pretrained import PretrainedTokenizer
from harness.task import Task, recipe_identity
from harness.tokenizer import WordTokenizer
from harness.training import Checkpoint, ModelConfig, TrainingResult, TrainRecipe, train

_logger = logging.getLogger(__name__)

Tokenizer = WordTokenizer | PretrainedTokenizer

_MODEL_CODE = [
    Path(harness.__file__).with_name(f)
    for f in ("model.py", "training.py", "tokenizer.py", "data.py", "bundle.py", "pretrained.py")
]


@dataclasses.dataclass
class Bundle:
    """A task's data and its trained reference model; read-only for methods."""

    task: str
    scale: str
    seed: int
    data: TaskData
    tokenizer: Tokenizer
    recipe: TrainRecipe
    model_config: ModelConfig
    checkpoints: list[Checkpoint]  # in training order; the last is the final model
    heldout_loss: float
    learned: dict[str, bool]  # query id -> the model produces its target
    learned_fraction_untrained: float  # the same check on the initial weights: chance level
    documents: Sequences  # the training documents, encoded as trained on
    model_key: str
    cache: Cache | None = None  # where derived artifacts (train features, replicas) go
    replica_index: int = 0  # 0: the reference model; k: the k-th independent retrain
    # the reference model's key, kept by replicas and variants: what retrain pools hang off
    setup_key: str = ""
    randomization: int | None = None  # set on re-initialised variants (and their replicas)

    def __post_init__(self) -> None:
        self.setup_key = self.setup_key or self.model_key

    def model(self, checkpoint: int = -1) -> torch.nn.Module:
        """A fresh model in eval mode holding the weights of one checkpoint."""
        model = self.model_config.build()
        model.load_weights(self.checkpoints[checkpoint].state)
        return model.eval()

    def encode_queries(self, queries: list[Query]) -> Sequences:
        return encode_completions(
            [q.prompt for q in queries],
            [q.target for q in queries],
            self.tokenizer,
            context=self.recipe.context,
        )

    def replica(self, index: int) -> Bundle:
        """The same task with a model trained independently (another seed); 0 is this one.

        Replicas use the same data, tokenizer and recipe, are trained on first use
        and cached like the reference model. Ensembles over models (TRAK) use them.
        Numbering continues from a replica (replica k's i-th replica is the
        reference's replica k + i), and a randomised bundle's replicas are
        randomised too, so a check run on either never mixes in other models.
        """
        if index == 0:
            return self
        if index < 0:
            raise ValueError(f"replica index must be non-negative, but got {index}")
        target = self.replica_index + index
        if self.randomization is not None:
            return self._with_random_weights(self.randomization, member=target)
        if self.cache is None:
            raise ValueError("this bundle has no cache to train replicas into")
        key = content_key({"reference": self.setup_key, "replica": target})
        if self.cache.has("models", key):
            _logger.info("found existing replica %d (%s) of model %s", target, key, self.setup_key)
        else:
            _logger.info("training replica %d of model %s", target, self.setup_key)
            result = train(
                self.model_config,
                self.documents,
                encode_documents(
                    list(self.data.heldout_texts), self.tokenizer, context=self.recipe.context
                ),
                self.recipe,
                seed=_replica_seed(self.seed, target),
            )
            store_model(self.cache, key, result, {"replica_of": self.setup_key, "replica": target})
        manifest = self.cache.manifest("models", key)
        return dataclasses.replace(
            self,
            checkpoints=load_checkpoints(self.cache.path("models", key), manifest),
            heldout_loss=manifest["heldout_loss"],
            model_key=key,
            replica_index=target,
        )

    def randomized(self, seed: int) -> Bundle:
        """The same task with every checkpoint replaced by freshly initialised weights.

        For the model-randomisation sanity check (Adebayo et al., 2018): scores
        that survive it do not depend on what the model learned.
        """
        return self._with_random_weights(seed, member=0)

    def _with_random_weights(self, variant: int, *, member: int) -> Bundle:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone
            torch.manual_seed(_randomized_seed(self.seed, variant, member))
            weights = self.model_config.build_random().weights()
        return dataclasses.replace(
            self,
            checkpoints=[
                Checkpoint(c.step, c.learning_rate, {k: v.clone() for k, v in weights.items()})
                for c in self.checkpoints
            ],
            model_key=content_key(
                {"reference": self.setup_key, "randomized": variant, "member": member}
            ),
            replica_index=member,
            randomization=variant,
        )

    @property
    def learned_queries(self) -> list[Query]:
        return [q for q in self.data.queries if self.learned[q.id]]


def prepare_task_data(task: Task, scale: str, *, seed: int, cache: Cache) -> TaskData:
    """The task's data alone (built or loaded; seconds): enough to check settings against."""
    return _task_data(task, scale, task.settings(scale).config, seed=seed, cache=cache)[0]


def prepare_bundle(
    task: Task, scale: str, *, seed: int, cache: Cache, train: bool = True
) -> Bundle:
    """The task's data and trained model, from the cache or built; ``train=False`` only loads."""
    preset = task.settings(scale)
    data, data_key = _task_data(task, scale, preset.config, seed=seed, cache=cache)
    model_key = content_key(
        {
            "data": data_key,
            "recipe": recipe_identity(preset.recipe),  # a pretrained model by its contents
            "code": code_fingerprint(_MODEL_CODE),
            "torch": torch.__version__,
        }
    )
    if cache.has("models", model_key):
        _logger.info(
            "found existing model %s for %s/%s, skipping training",
            model_key,
            task.label(scale),
            scale,
        )
    elif not train:
        raise LookupError(
            f"no trained model for {task.name}/{scale} with seed {seed} in {cache.root}; "
            f"run `harness run --task {task.name} --scale {scale} --seed {seed} ...` first"
        )
    else:
        _train_and_store(data, preset.recipe, seed=seed, cache=cache, key=model_key)
    return _load_bundle(task.name, scale, seed, data, preset.recipe, cache, model_key)


def _task_data(
    task: Task, scale: str, config: Params, *, seed: int, cache: Cache
) -> tuple[TaskData, str]:
    key = content_key(
        {
            "task": task.name,
            "scale": scale,
            "config": task.config_identity(config),
            "seed": seed,
            "code": code_fingerprint(task.source_files()),
        }
    )
    path = cache.path("tasks", key) / "task.json"
    if cache.has("tasks", key):
        # debug: a run loads its data twice, once to check settings and once to train
        _logger.debug("found existing %s/%s data %s", task.label(scale), scale, key)
        return TaskData.load(path), key
    started = time.perf_counter()
    data = task.build(config, seed=seed)
    with cache.writing(
        "tasks",
        key,
        {"task": task.name, "scale": scale, "seed": seed, "fingerprint": data.fingerprint()},
    ) as staging:
        data.save(staging / "task.json")
    _logger.info(
        "built %s/%s: %d documents, %d queries in %.1f s",
        task.label(scale),
        scale,
        len(data.documents),
        len(data.queries),
        time.perf_counter() - started,
    )
    return data, key


def _train_and_store(
    data: TaskData, recipe: TrainRecipe, *, seed: int, cache: Cache, key: str
) -> None:
    texts = [document.text for document in data.documents]
    if recipe.pretrained:
        tokenizer = PretrainedTokenizer(recipe.pretrained)
    else:
        tokenizer = WordTokenizer.fit(
            texts, min_count=recipe.min_word_count, reserved=data.reserved_words
        )
    _check_fits_context(data, tokenizer, context=recipe.context)
    config = recipe.model_config(len(tokenizer))
    documents = encode_documents(texts, tokenizer, context=recipe.context)
    heldout = encode_documents(list(data.heldout_texts), tokenizer, context=recipe.context)

    # the initial weights train() starts from: how many queries pass by chance (or, for a
    # pretrained model, how many it knew before fine-tuning)
    torch.manual_seed(seed)
    initial = config.build().eval()
    _check_vocabulary(initial, tokenizer)
    untrained = _learned(initial, data.queries, tokenizer, context=recipe.context)
    result = train(config, documents, heldout, recipe, seed=seed)
    model = config.build()
    model.load_weights(result.checkpoints[-1].state)
    learned = _learned(model.eval(), data.queries, tokenizer, context=recipe.context)

    details = {
        "learned": learned,
        "learned_fraction_untrained": sum(untrained.values()) / len(untrained),
        "vocab_size": len(tokenizer),
    }
    # a pretrained model's tokenizer stays in its own folder
    store_model(cache, key, result, details, tokenizer=None if recipe.pretrained else tokenizer)


def _check_vocabulary(model: torch.nn.Module, tokenizer: Tokenizer) -> None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None and hasattr(model, "inner"):
        embeddings = model.inner.get_input_embeddings()
    if embeddings is not None and len(tokenizer) > embeddings.num_embeddings:
        raise ParameterError(
            f"the tokenizer has {len(tokenizer)} tokens but the model embeds only "
            f"{embeddings.num_embeddings}; the model and tokenizer folders do not match"
        )


def store_model(
    cache: Cache,
    key: str,
    result: TrainingResult,
    details: dict,
    *,
    tokenizer: WordTokenizer | None = None,
) -> None:
    """Write a trained model's checkpoints (and tokenizer) and manifest as one cache entry.

    ``details`` go into the manifest; :func:`load_checkpoints` reads the checkpoints back.
    """
    manifest = {
        "checkpoints": [
            {"step": c.step, "learning_rate": c.learning_rate} for c in result.checkpoints
        ],
        "heldout_loss": result.heldout_loss,
        "train_loss": result.train_loss,
        "train_seconds": result.seconds,
        **details,
    }
    with cache.writing("models", key, manifest) as staging:
        for checkpoint in result.checkpoints:
            save_file(checkpoint.state, staging / f"checkpoint-{checkpoint.step}.safetensors")
        if tokenizer is not None:
            tokenizer.save(staging / "tokenizer.json")


def _check_fits_context(data: TaskData, tokenizer: Tokenizer, *, context: int) -> None:
    """Refuse, before training, documents the model would see truncated or queries too long."""
    lengths = {d.id: len(tokenizer.encode(d.text)) for d in data.documents}
    too_long = sorted(doc_id for doc_id, n in lengths.items() if n > context)
    if too_long:
        raise ParameterError(
            f"{len(too_long)} documents exceed the model's context of {context} tokens "
            f"(longest {max(lengths.values())}, e.g. {too_long[:3]}); they would be truncated "
            "and their ground truth lost. Shorten them or raise the recipe's context "
            "(--task-param model.context=N)."
        )
    for query in data.queries:
        try:
            encode_completions([query.prompt], [query.target], tokenizer, context=context)
        except ValueError as error:
            raise ParameterError(f"query {query.id!r}: {error}") from None


def _load_bundle(
    task: str, scale: str, seed: int, data: TaskData, recipe: TrainRecipe, cache: Cache, key: str
) -> Bundle:
    folder, manifest = cache.path("models", key), cache.manifest("models", key)
    tokenizer = (
        PretrainedTokenizer(recipe.pretrained)
        if recipe.pretrained
        else WordTokenizer.load(folder / "tokenizer.json")
    )
    return Bundle(
        task=task,
        scale=scale,
        seed=seed,
        data=data,
        tokenizer=tokenizer,
        recipe=recipe,
        model_config=recipe.model_config(len(tokenizer)),
        checkpoints=load_checkpoints(folder, manifest),
        heldout_loss=manifest["heldout_loss"],
        learned=manifest["learned"],
        learned_fraction_untrained=manifest["learned_fraction_untrained"],
        documents=encode_documents(
            [d.text for d in data.documents], tokenizer, context=recipe.context
        ),
        model_key=key,
        cache=cache,
    )


def load_checkpoints(folder: Path, manifest: dict) -> list[Checkpoint]:
    return [
        # safetensors holds plain tensors only: loading it runs no code
        Checkpoint(
            c["step"],
            c["learning_rate"],
            load_file(folder / f"checkpoint-{c['step']}.safetensors"),
        )
        for c in manifest["checkpoints"]
    ]


def _randomized_seed(seed: int, variant: int, member: int) -> int:
    return 999_999_937 * (variant + 1) + 7_919 * member + seed


def _replica_seed(seed: int, index: int) -> int:
    # far from the small seeds users pick, so a replica never repeats another run's model
    return 1_000_003 * (index + 1) + seed


@torch.no_grad()
def _learned(
    model: torch.nn.Module, queries: Sequence[Query], tokenizer: Tokenizer, *, context: int
) -> dict[str, bool]:
    """A query counts as learned when its target is the likeliest of its candidates."""
    learned = {}
    for query in queries:
        candidates = list(query.candidates) or [query.target]
        sequences = encode_completions(
            [query.prompt] * len(candidates), candidates, tokenizer, context=context
        )
        losses = sequence_losses(model(sequences.inputs), sequences.targets, sequences.loss_mask)
        learned[query.id] = candidates[int(losses.argmin())] == query.target
    return learned

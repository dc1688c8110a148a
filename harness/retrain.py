"""Counterfactual ground truth: models retrained on chosen subsets of the training documents.

A *pool* is M models, each trained with the task's recipe on its own random
α-subset of the documents, with each model's log-probability of every query's
target. LDS (:mod:`harness.evaluation`) compares methods against one pool; datamodels
learn from another. Pools are cached per (task data, recipe, purpose, α, seed)
and grow model by model: each finished model is written on its own, atomically,
so an interrupted build resumes where it stopped and a larger pool reuses the
models of a smaller one.

Each retrain keeps the recipe's epochs rather than its steps (a model on half
the documents takes half the steps), so that it sees each of its documents as
often as the reference model does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import harness
from harness.cache import code_fingerprint, content_key
from harness.data import Sequences, encode_completions, encode_documents
from harness.executor import Executor, default_executor, describe
from harness.model import sequence_losses
from harness.training import ModelConfig, TrainRecipe, train

_logger = logging.getLogger(__name__)

# Every retrain's seed belongs to one purpose: the seeds of different purposes
# never coincide (they differ modulo len(PURPOSES)), so a datamodel is never
# fitted on a model that LDS later scores it against.
PURPOSES = ("lds", "datamodel")
_SEED_BASE = 10**12  # far above the seeds of reference models and their replicas
_SEEDS_PER_TASK_SEED = 10**9

_CODE = [Path(harness.__file__).with_name(f) for f in ("retrain.py", "training.py", "model.py")]


def retrain_seed(purpose: str, task_seed: int, index: int) -> int:
    """Seed of the ``index``-th retrain made for ``purpose`` on a task built with ``task_seed``."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown retrain purpose {purpose!r}; valid: {', '.join(PURPOSES)}")
    if not 0 <= index < _SEEDS_PER_TASK_SEED // len(PURPOSES):
        raise ValueError(f"retrain index {index} is out of range")
    return (
        _SEED_BASE
        + task_seed * _SEEDS_PER_TASK_SEED
        + index * len(PURPOSES)
        + PURPOSES.index(purpose)
    )


def subset_recipe(recipe: TrainRecipe, kept_fraction: float) -> TrainRecipe:
    """Recipe for a model on ``kept_fraction`` of the documents: same epochs, one checkpoint."""
    steps = max(1, round(recipe.steps * kept_fraction))
    return dataclasses.replace(
        recipe,
        steps=steps,
        warmup_steps=min(steps - 1, round(recipe.warmup_steps * kept_fraction)),
        checkpoints=1,
    )


@dataclasses.dataclass(frozen=True)
class RetrainJob:
    """Everything one retrain needs, picklable so that it can run in another process."""

    index: int
    seed: int
    kept: np.ndarray  # indices of the training documents kept, sorted
    config: ModelConfig
    recipe: TrainRecipe  # the task's recipe; scaled to the subset when run
    documents: Sequences
    heldout: Sequences
    queries: Sequences  # every query of the task, target tokens masked in


@dataclasses.dataclass(frozen=True)
class RetrainResult:
    target_logprobs: np.ndarray  # one per query: log p(target | prompt), summed over tokens
    heldout_loss: float
    seconds: float


def run_retrain(job: RetrainJob) -> RetrainResult:
    """Train a fresh model on the kept documents; read off each query's target log-probability."""
    recipe = subset_recipe(job.recipe, len(job.kept) / len(job.documents))
    kept = job.documents[torch.as_tensor(job.kept, dtype=torch.long)]
    result = train(job.config, kept, job.heldout, recipe, seed=job.seed)
    model = job.config.build()
    model.load_weights(result.checkpoints[-1].state)
    return RetrainResult(
        target_logprobs(model.eval(), job.queries), result.heldout_loss, result.seconds
    )


@torch.no_grad()
def target_logprobs(
    model: torch.nn.Module, queries: Sequences, *, batch_size: int = 256
) -> np.ndarray:
    values = []
    for start in range(0, len(queries), batch_size):
        batch = queries[start : start + batch_size]
        values.append(-sequence_losses(model(batch.inputs), batch.targets, batch.loss_mask))
    return torch.cat(values).double().numpy()


@dataclasses.dataclass(frozen=True)
class SubsetPool:
    """M retrained models: documents each kept, its seed, and its target log-probabilities."""

    purpose: str
    fraction: float
    key: str
    seeds: np.ndarray  # (M,)
    masks: np.ndarray  # (M, n_documents) bool: document i was in model m's training set
    logprobs: np.ndarray  # (M, n_queries) over every query of the task
    query_ids: tuple[str, ...]
    heldout_losses: np.ndarray  # (M,)

    def __len__(self) -> int:
        return len(self.seeds)

    def targets(self, query_ids: Sequence[str]) -> np.ndarray:
        """Target log-probabilities of the given queries, (M, len(query_ids))."""
        column = {query_id: i for i, query_id in enumerate(self.query_ids)}
        missing = [q for q in query_ids if q not in column]
        if missing:
            raise KeyError(f"queries not in pool {self.key}: {missing[:3]}")
        return self.logprobs[:, [column[q] for q in query_ids]]


def ensure_disjoint(first: SubsetPool, second: SubsetPool) -> None:
    """Refuse to evaluate against a pool that shares a retrained model with the one fitted on."""
    shared = np.intersect1d(first.seeds, second.seeds)
    if shared.size:
        raise ValueError(
            f"pools {first.key} ({first.purpose}) and {second.key} ({second.purpose}) share "
            f"{shared.size} retrained models (seeds {shared[:3].tolist()}); a method fitted "
            "on retrains must be evaluated on other retrains"
        )


def build_pool(
    bundle,
    purpose: str,
    *,
    models: int,
    fraction: float,
    executor: Executor | None = None,
) -> SubsetPool:
    """Load the pool, training whatever models it still lacks; see the module docstring."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown pool purpose {purpose!r}; valid: {', '.join(PURPOSES)}")
    if models < 2:
        raise ValueError(f"a pool needs at least 2 models, but got {models}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"subset fraction must lie strictly between 0 and 1, but got {fraction}")
    n_documents = len(bundle.data.documents)
    kept_count = round(fraction * n_documents)
    if not 0 < kept_count < n_documents:
        raise ValueError(
            f"fraction {fraction} of {n_documents} documents keeps {kept_count}; "
            "each model must keep some documents and leave some out"
        )
    if bundle.cache is None:
        raise ValueError("this bundle has no cache to keep a retrain pool in")
    key = content_key(
        {
            "setup": bundle.setup_key,
            "purpose": purpose,
            "fraction": fraction,
            "seed": bundle.seed,
            "code": code_fingerprint(_CODE),
        }
    )
    folder = bundle.cache.path("pools", key)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(
        folder / "pool.json",
        {"purpose": purpose, "fraction": fraction, "setup": bundle.setup_key, "seed": bundle.seed},
    )
    done = {i: record for i in range(models) if (record := _read_model(folder, i)) is not None}
    missing = [i for i in range(models) if i not in done]
    if missing:
        executor = executor or default_executor()
        _logger.info(
            "%s pool %s: %d of %d models stored; training %d on %d%% subsets (%s)",
            purpose, key, len(done), models, len(missing), round(100 * fraction),
            describe(executor),
        )  # fmt: skip
        jobs = (_job(bundle, i, retrain_seed(purpose, bundle.seed, i), fraction) for i in missing)
        progress = tqdm(
            total=len(missing), desc=f"{purpose} pool", unit="model", leave=False, disable=None
        )
        with progress, _report_interruption(purpose, folder, models):
            for job, result in executor.run(run_retrain, jobs):
                record = {
                    "index": job.index,
                    "seed": job.seed,
                    "kept": job.kept.tolist(),
                    "target_logprobs": dict(
                        zip(_query_ids(bundle), result.target_logprobs.tolist(), strict=True)
                    ),
                    "heldout_loss": result.heldout_loss,
                    "seconds": result.seconds,
                }
                write_atomically(_model_path(folder, job.index), record)
                done[job.index] = record
                progress.update()
                _logger.info(
                    "%s pool: model %d trained in %.0f s (%d of %d stored)",
                    purpose, job.index, result.seconds, len(done), models,
                )  # fmt: skip
    else:
        _logger.info("reusing %s pool %s: all %d models stored", purpose, key, models)
    return _assemble(purpose, fraction, key, [done[i] for i in range(models)], bundle)


@contextlib.contextmanager
def _report_interruption(purpose: str, folder: Path, models: int):
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        stored = sum(1 for i in range(models) if _model_path(folder, i).is_file())
        _logger.warning(
            "%s pool interrupted with %d of %d models stored; the same command resumes it",
            purpose, stored, models,
        )  # fmt: skip
        raise


def _job(bundle, index: int, seed: int, fraction: float) -> RetrainJob:
    n = len(bundle.data.documents)
    kept = np.sort(np.random.default_rng(seed).choice(n, size=round(fraction * n), replace=False))
    return retrain_job(bundle, index, seed, kept)


def retrain_job(bundle, index: int, seed: int, kept: np.ndarray) -> RetrainJob:
    """A job that trains the bundle's architecture on the documents ``kept``."""
    context = bundle.recipe.context
    return RetrainJob(
        index=index,
        seed=seed,
        kept=np.asarray(kept, dtype=np.int64),
        config=bundle.model_config,
        recipe=bundle.recipe,
        documents=bundle.documents,
        heldout=encode_documents(
            list(bundle.data.heldout_texts), bundle.tokenizer, context=context
        ),
        queries=encode_completions(
            [q.prompt for q in bundle.data.queries],
            [q.target for q in bundle.data.queries],
            bundle.tokenizer,
            context=context,
        ),
    )


def _query_ids(bundle) -> list[str]:
    return [q.id for q in bundle.data.queries]


def _assemble(purpose, fraction, key, records, bundle) -> SubsetPool:
    query_ids = tuple(_query_ids(bundle))
    masks = np.zeros((len(records), len(bundle.data.documents)), dtype=bool)
    for row, record in enumerate(records):
        masks[row, record["kept"]] = True
    return SubsetPool(
        purpose=purpose,
        fraction=fraction,
        key=key,
        seeds=np.array([r["seed"] for r in records], dtype=np.int64),
        masks=masks,
        logprobs=np.array([[r["target_logprobs"][q] for q in query_ids] for r in records]),
        query_ids=query_ids,
        heldout_losses=np.array([r["heldout_loss"] for r in records]),
    )


def _model_path(folder: Path, index: int) -> Path:
    return folder / f"model-{index:05d}.json"


def _read_model(folder: Path, index: int) -> dict | None:
    """A stored model's record; None when absent or unreadable (it is then trained again)."""
    path = _model_path(folder, index)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        _logger.warning(
            "retraining pool model %d: its record %s is unreadable (%s)", index, path, error
        )
        return None


def write_atomically(path: Path, content: dict) -> None:
    """Write JSON beside the target, then rename: a killed process leaves the old file or none."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(content, file)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename makes it visible
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

"""What the benchmark scripts share: reading a task's stored model and pools, training nothing."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from harness.bundle import Bundle, prepare_bundle
from harness.cache import Cache
from harness.errors import HarnessError
from harness.executor import RefusingExecutor
from harness.retrain import SubsetPool, build_pool
from harness.task import TASKS

NO_TRAINING = RefusingExecutor("run `harness run` first to build the pools")


def size_list(minimum: int, why: str) -> Callable[[str], list[int]]:
    """An argparse type for comma-separated pool sizes, each at least ``minimum``."""

    def parse(text: str) -> list[int]:
        try:
            sizes = [int(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, got {text!r}"
            ) from None
        if not sizes or min(sizes) < minimum:
            raise argparse.ArgumentTypeError(
                f"sizes must be at least {minimum} ({why}), got {text!r}"
            )
        return sizes

    return parse


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="facts")
    parser.add_argument("--scale", default=None, help="the task's default if omitted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=Path("results"))


def stored_bundle(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Bundle:
    """The task's trained bundle from the results cache; a usage error if it is not there."""
    try:
        task = TASKS.get(args.task)()
        scale = args.scale or task.default_scale
        cache = Cache(args.results_dir / "cache")
        return prepare_bundle(task, scale, seed=args.seed, cache=cache, train=False)
    except (HarnessError, LookupError) as error:
        parser.error(str(error))


def stored_pool(
    parser: argparse.ArgumentParser, bundle: Bundle, purpose: str, *, models: int, fraction: float
) -> SubsetPool:
    """A complete pool from the cache; a usage error if any of its models is missing."""
    try:
        return build_pool(bundle, purpose, models=models, fraction=fraction, executor=NO_TRAINING)
    except (RuntimeError, ValueError) as error:
        parser.error(f"{purpose} pool: {error}")

"""Where the expensive fan-out runs: subset retrains for LDS, datamodels and removal.

Every caller goes through :class:`Executor`, so the engine can change without
touching them. The default is local: jobs run in this process when one worker
fits the machine, otherwise in a pool of spawned processes that split the
cores between them. A distributed engine (Dask, a cluster) plugs in as
another subclass.

On a 2-core machine one process with 2 torch threads trains these small models
as fast as two processes with one thread each, so the default is one worker
per 2 cores.
"""

from __future__ import annotations

import abc
import concurrent.futures
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

from harness.resources import keep_freed_memory

_logger = logging.getLogger(__name__)

Job = TypeVar("Job")
Result = TypeVar("Result")

THREADS_PER_WORKER = 2


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_workers() -> int:
    """Workers that fit this machine: one per ``THREADS_PER_WORKER`` usable cores."""
    return max(1, usable_cores() // THREADS_PER_WORKER)


class Executor(abc.ABC):
    """Runs independent jobs and yields ``(job, result)`` pairs as each one finishes."""

    workers: int

    @abc.abstractmethod
    def run(
        self, function: Callable[[Job], Result], jobs: Iterable[Job]
    ) -> Iterator[tuple[Job, Result]]:
        """Apply ``function`` to every job; order of completion, not of submission."""


class InlineExecutor(Executor):
    """Jobs one after another in this process, with all of its torch threads."""

    workers = 1

    def run(self, function, jobs):
        for job in jobs:
            yield job, function(job)


class ProcessExecutor(Executor):
    """A local pool of spawned processes, the cores split evenly between them.

    ``function`` and jobs must be picklable (module-level functions, plain data
    and tensors). When a job fails, jobs not yet started are cancelled, those
    running are waited for and yielded like every finished one, so that their
    results can be kept, and then the first error is raised. When the caller
    stops (an interrupt, or an error of its own), nothing is waited for.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, but got {workers}")
        self.workers = workers

    def run(self, function, jobs):
        threads = max(1, usable_cores() // self.workers)
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(threads,),
        )
        finished = False
        try:
            futures = {pool.submit(function, job): job for job in jobs}
            error: BaseException | None = None
            for future in concurrent.futures.as_completed(futures):
                if future.cancelled():
                    continue
                if future.exception() is not None:
                    if error is None:
                        error = future.exception()
                        _logger.error("a job failed; cancelling the jobs not yet started")
                        for pending in futures:
                            pending.cancel()
                    continue
                yield futures[future], future.result()
            finished = True
            if error is not None:
                raise error
        finally:
            # a caller that stopped early should not wait for jobs it will never read
            pool.shutdown(wait=finished, cancel_futures=True)


def _start_worker(threads: int) -> None:
    keep_freed_memory()
    torch.set_num_threads(threads)


_configured_workers: int | None = None


def configure(*, workers: int | None) -> None:
    """Set the number of workers :func:`default_executor` uses (``None``: the machine's)."""
    global _configured_workers
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, but got {workers}")
    _configured_workers = workers


def default_executor() -> Executor:
    """The executor the command line configured (``--workers``), else one sized to the machine."""
    workers = _configured_workers or machine_workers()
    return InlineExecutor() if workers == 1 else ProcessExecutor(workers)


def describe(executor: Executor) -> str:
    kind = "in this process" if isinstance(executor, InlineExecutor) else "in local processes"
    return f"{executor.workers} worker{'s' if executor.workers != 1 else ''} {kind}"


class RefusingExecutor(Executor):
    """For read-only tools: any job means a cache lacks something, and that is an error."""

    workers = 1

    def __init__(self, advice: str) -> None:
        self.advice = advice

    def run(self, function, jobs):
        pending = list(jobs)
        if pending:
            raise RuntimeError(f"{len(pending)} jobs would have to run; {self.advice}")
        yield from ()

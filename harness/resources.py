"""Cost measurement: wall time and peak resident memory of a block of work."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
import time

import psutil


def release_free_memory() -> None:
    """Return memory freed by earlier work to the operating system, where the C library can.

    glibc keeps freed blocks for reuse, so without this the resident size stays
    at the high-water mark of whatever ran before, and a later measurement would
    see less growth for the same work.
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS at once.

    Gradient work allocates and frees tensors of tens of megabytes per chunk;
    by default each one is a fresh mapping whose pages fault in again, which
    costs more than the arithmetic on them (about a third of per-example gradient
    time on a 2-core machine). Called by the command line, never on import: it
    changes the whole process. Returns whether the C library took the settings.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    return all(
        libc.mallopt(parameter, value) == 1
        for parameter, value in (
            (_M_MMAP_THRESHOLD, 32 * 2**20),  # glibc's largest: blocks below it come from the heap
            (_M_TOP_PAD, 2**30),
            (_M_TRIM_THRESHOLD, 2**31 - 1),
        )
    )


class CostMeter:
    """Times a block and samples its process's resident memory in a background thread.

    ``peak_memory_mb`` is the highest resident set size seen while the block ran,
    minus the size when it started (after freed memory is released): the memory
    the work itself needed. Sampling misses peaks shorter than ``interval``.
    """

    def __init__(self, *, interval: float = 0.005) -> None:
        self.interval = interval
        self.seconds = 0.0
        self.peak_memory_mb = 0.0
        self._process = psutil.Process()
        self._stop = threading.Event()

    def __enter__(self) -> CostMeter:
        release_free_memory()
        self._baseline = self._peak = self._process.memory_info().rss
        self._stop.clear()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self._started
        self._stop.set()
        self._sampler.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.peak_memory_mb = (self._peak - self._baseline) / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._process.memory_info().rss)

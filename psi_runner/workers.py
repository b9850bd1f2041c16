"""Per-value Python work (phone parsing, hashing) spread over the cores this process may use.

A pool of ``spawn``ed processes, not forked ones: the job process may hold threads, and a
lock held by one of them at the fork would never open in the child. Starting the pool costs
about 0.3 s, so callers use it only for columns large enough to win that back.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

log = logging.getLogger("psi_runner.workers")

T = TypeVar("T")
R = TypeVar("R")


def cores() -> int:
    """Cores this process may use (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def map_chunks(fn: Callable[[T], R], chunks: Iterable[T], workers: int) -> list[R]:
    """``[fn(c) for c in chunks]``, in order, over ``workers`` processes (``fn`` must be a
    module-level function, so that a spawned process can import it)."""
    chunks = list(chunks)
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            return list(pool.map(fn, chunks))
    except (BrokenProcessPool, OSError) as exc:
        # E.g. a main module that a spawned process cannot import: slower, same result.
        log.warning("worker processes failed (%s); continuing in this process", exc)
        return [fn(c) for c in chunks]

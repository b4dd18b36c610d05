"""Per-matrix work on every core.

Quantizing one matrix is NumPy work that mostly runs on one core (sorts, bincounts, a column loop), and matrices
are independent once their inputs are known, so a pool of worker processes runs them side by side. Results do
not depend on the number of workers: each matrix's computation is the same wherever it runs, and results come
back in input order.

Workers are spawned (not forked: the parent may hold torch's and BLAS's thread pools) and each keeps BLAS to one
thread, so N workers use N cores.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_jobs() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _one_blas_thread() -> None:
    from threadpoolctl import threadpool_limits

    # Held for the worker's lifetime: the limiter object must stay referenced.
    global _LIMIT
    _LIMIT = threadpool_limits(1)


class MatrixPool:
    """`with MatrixPool(jobs) as pool: pool.map(fn, items)`; jobs <= 1 runs everything in this process."""

    def __init__(self, jobs: int | None = None):
        self.jobs = default_jobs() if jobs is None else max(1, int(jobs))
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> MatrixPool:
        if self.jobs > 1:
            self._executor = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_one_blas_thread)
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """fn over items, results in input order, yielded as they are ready (for progress bars). Items are drawn
        from the iterable only a few ahead of the results (unlike Executor.map, which takes them all at once), so
        a generator that builds large inputs (a block's Hessians) never has many of them alive."""
        if self._executor is None:
            yield from map(fn, items)
            return
        pending: deque = deque()
        for item in items:
            pending.append(self._executor.submit(fn, item))
            if len(pending) >= 2 * self.jobs:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

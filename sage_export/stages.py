"""Wall time and peak resident memory of each stage of a run, for reports and the scale benchmark.

Memory is the resident set of this process plus all its children (the quantization workers), sampled by a daemon
thread every `interval` seconds; a stage's peak is the largest sample taken while it ran. Sampling can miss a
spike shorter than the interval, and summing RSS counts pages shared between processes once per process (the
workers are spawned, so they share little).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager


def tree_rss_bytes(process=None) -> int:
    """RSS of a process and its descendants; processes that exit while being read count as zero."""
    import psutil

    process = process or psutil.Process()
    total = 0
    for p in [process] + process.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class StageMeter:
    """`with StageMeter() as meter: with meter.step("load"): ...`; then meter.timings (s) and meter.peak_mb."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.timings: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StageMeter:
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(self.interval):
            self._record(tree_rss_bytes(me))

    def _record(self, rss: int) -> None:
        with self._lock:
            self._peak = max(self._peak, rss)

    @contextmanager
    def step(self, name: str):
        with self._lock:
            self._peak = 0
        self._record(tree_rss_bytes())
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 2)
            self._record(tree_rss_bytes())
            with self._lock:
                self.peak_mb[name] = round(self._peak / 2**20, 1)

"""Shared pieces of the benchmark suite: the result row, timers and a peak-RSS sampler."""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import psutil


@dataclass
class Figure:
    """One measured quantity: what it is, its value and its unit."""

    label: str
    value: float
    unit: str


@dataclass
class Row:
    """One comparison: ours vs the reference, their ratio and the target it must meet.

    ``ratio`` is always "how many times better ours is" in the sense of ``ratio_meaning``;
    ``met`` is None when there is no target (ratio only).
    """

    name: str
    title: str
    ours: Figure
    reference: Optional[Figure]
    ratio: Optional[float]
    ratio_meaning: str
    target: str
    met: Optional[bool]
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    conditions: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def conditions(quick: bool) -> dict[str, Any]:
    """Thread settings and machine load when a row starts (numbers on a busy machine are contended)."""
    import torch

    load1, load5, load15 = os.getloadavg()
    return {"quick": quick, "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "cpu_count": os.cpu_count(), "loadavg": [load1, load5, load15]}


def best_time(fn: Callable[[], Any], repeat: int) -> float:
    """The shortest wall time of ``repeat`` calls of ``fn`` (seconds)."""
    best = math.inf
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` is the highest value seen while active."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.inf


MIB = float(1 << 20)


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a fresh spawned Python process (its own peak memory, nothing left over
    from earlier measurements); ``fn`` must be a top-level function of an importable module."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()

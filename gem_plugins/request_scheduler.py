"""Flow control for remote oracles: how many requests to keep in flight, and when one is late.

:class:`AdaptiveConcurrency` grows slowly and shrinks fast: every answer raises the limit by
about one per round of requests (then more slowly once the server has pushed back), and every sign of overload (HTTP 429, a
refused connection) lowers it by one, within 1 and the user's ``max_concurrency``. So a high
``max_concurrency`` settles at what the server accepts instead of spending its time on rejected
requests and their back-off.

:class:`LatencyTracker` keeps the recent reply times; a request slower than a multiple of their
median is a straggler, and the oracle sends it again (a hedged request, "The Tail at Scale",
Dean & Barroso 2013) and keeps whichever answer comes first.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from typing import Optional


class AdaptiveConcurrency:
    """A limit on requests in flight between 1 and ``maximum`` that adapts to overload.

    It starts at ``start`` (at most ``maximum``) and, until the server first turns a request
    away, every answer raises it by one (doubling it every round, TCP's slow start). Each
    rejected request lowers it by one: when ``k`` of ``n`` requests in flight are turned away,
    the server took about ``n - k``, and that is where the limit lands. From then on it grows by
    one every :attr:`PROBE_ROUNDS` rounds of requests, to probe for more room, while ``probing``
    (the scheduler turns it off once every request has been sent: a probe then only delays the
    last answers).
    """

    #: After the first rejection the limit grows by one every this many rounds: each probe past
    #: what the server takes costs one rejected request and its Retry-After wait.
    PROBE_ROUNDS = 4

    def __init__(self, maximum: int, start: int = 8):
        self.maximum = int(maximum)
        self._limit = float(min(start, maximum))
        self.rejections = 0
        self.probing = True
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        return max(1, int(self._limit))

    def on_success(self) -> None:
        with self._lock:
            if self.rejections and not self.probing:
                return
            step = 1.0 if not self.rejections else 1.0 / (self.PROBE_ROUNDS * max(self._limit, 1.0))
            self._limit = min(float(self.maximum), self._limit + step)

    def on_overload(self) -> None:
        """The server turned a request away (HTTP 429, a refused connection)."""
        with self._lock:
            self._limit = max(1.0, self._limit - 1.0)
            self.rejections += 1


class LatencyTracker:
    """Median of the last ``window`` reply times, and the straggler threshold derived from it."""

    def __init__(self, factor: Optional[float], floor: float = 1.0, min_samples: int = 8, window: int = 200):
        self.factor = factor
        self.floor = floor
        self.min_samples = min_samples
        self._samples: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)

    def straggler_after(self) -> float:
        """Seconds after which a request counts as a straggler (inf: hedging off or too few samples)."""
        if self.factor is None or len(self._samples) < self.min_samples:
            return float("inf")
        return max(self.factor * statistics.median(self._samples), self.floor)

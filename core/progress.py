"""What a command shows while it works: stage messages through :mod:`logging` (logger ``gem``) and
progress for every long stage.

On a terminal, progress is a tqdm bar. Otherwise (a log file, CI, a pipe) it is one plain line
every :data:`LINE_EVERY_PERCENT` % or :data:`LINE_EVERY_SECONDS` s, whichever comes first (but
not more often than every :data:`LINE_AT_MOST_EVERY_SECONDS` s), and one when the stage ends, so a
redirected run writes a readable log instead of megabytes of carriage returns.
``--quiet`` (:func:`setup_logging` with ``verbosity=-1``) hides both; ``-v`` adds debug messages.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Optional, TextIO

__all__ = ["logger", "setup_logging", "add_verbosity_options", "setup_from_args", "progress", "showing_progress",
           "LineProgress", "LINE_EVERY_PERCENT", "LINE_EVERY_SECONDS", "LINE_AT_MOST_EVERY_SECONDS"]

logger = logging.getLogger("gem")

LINE_EVERY_PERCENT = 10
LINE_EVERY_SECONDS = 30.0
LINE_AT_MOST_EVERY_SECONDS = 2.0

_quiet = False


def setup_logging(verbosity: int = 0, stream: Optional[TextIO] = None) -> None:
    """Route gem's messages to ``stream`` (standard error): ``-1`` warnings only and no progress,
    ``0`` stage messages and progress, ``1`` or more also debug messages."""
    global _quiet
    _quiet = verbosity < 0
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(stream) if stream is not None else _StandardError()
    handler.setFormatter(logging.Formatter("%(message)s" if verbosity < 1 else "%(asctime)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    for old in [h for h in logger.handlers if getattr(h, "_gem", False)]:
        logger.removeHandler(old)
    handler._gem = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class _StandardError(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a message is logged (a test's
    capture, or a redirect that has replaced the one in place when logging was set up)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def showing_progress() -> bool:
    """False under ``--quiet`` or with ``TQDM_DISABLE`` set."""
    return not _quiet and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")


def progress(total: Optional[float], desc: str, unit: str = "it", disable: bool = False,
             stream: Optional[TextIO] = None, **tqdm_options: Any) -> Any:
    """A progress counter with tqdm's ``update``, ``set_postfix``, ``write`` and ``close`` (and a
    context manager): a tqdm bar on a terminal, a :class:`LineProgress` otherwise, and a silent
    one when ``disable`` or under ``--quiet``."""
    stream = stream or sys.stderr
    disable = disable or not showing_progress()
    if not disable and _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, **tqdm_options)
    return LineProgress(total, desc, unit, stream=stream, disable=disable)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """Progress as plain lines: ``desc: 40% (400/1000 step), 12 s, about 18 s left, loss=3.9``."""

    def __init__(self, total: Optional[float], desc: str, unit: str = "it", stream: Optional[TextIO] = None,
                 disable: bool = False, every_percent: float = LINE_EVERY_PERCENT,
                 every_seconds: float = LINE_EVERY_SECONDS, at_most_every: float = LINE_AT_MOST_EVERY_SECONDS):
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.stream = stream or sys.stderr
        self.every_percent, self.every_seconds, self.at_most_every = every_percent, every_seconds, at_most_every
        self.n = 0
        self.postfix = ""
        self.started = self._last_time = time.perf_counter()
        self._last_percent = 0.0
        self._emitted: float = 0
        self._closed = False

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.perf_counter()
        percent = 100.0 * self.n / self.total if self.total else 0.0
        since = now - self._last_time
        due_percent = (self.total and percent >= self._last_percent + self.every_percent and self.n < self.total
                       and since >= self.at_most_every)
        if due_percent or since >= self.every_seconds:
            self._emit(now)
            self._last_percent = percent - percent % self.every_percent if self.every_percent else percent

    def set_postfix(self, ordered_dict: Optional[dict] = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def write(self, message: str) -> None:
        if not self.disable:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """The last line: where the stage ended (also when it stopped early)."""
        if not self._closed and self.n and self.n != self._emitted:
            self._emit(time.perf_counter())
        self._closed = True

    def line(self, now: float) -> str:
        elapsed = now - self.started
        if self.total:
            text = f"{self.desc}: {100.0 * self.n / self.total:.0f}% ({_amount(self.n, self.total, self.unit)})"
        else:
            text = f"{self.desc}: {_amount(self.n, None, self.unit)}"
        text += f", {_duration(elapsed)}"
        if self.total and 0 < self.n < self.total:
            text += f", about {_duration(elapsed * (self.total - self.n) / self.n)} left"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _emit(self, now: float) -> None:
        self._last_time, self._emitted = now, self.n
        if not self.disable:
            print(self.line(now), file=self.stream, flush=True)


def _amount(n: float, total: Optional[float], unit: str) -> str:
    """``400/1000 step``; bytes in kB, MB or GB (``15.2/30.0 MB``)."""
    if unit == "B":
        size = total or n
        scale, name = (1e9, "GB") if size >= 1e9 else (1e6, "MB") if size >= 1e6 else (1e3, "kB")
        return (f"{n / scale:.1f}/{total / scale:.1f} {name}" if total else f"{n / scale:.1f} {name}")
    return f"{n:g}/{total:g} {unit}" if total else f"{n:g} {unit}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def add_verbosity_options(parser: Any) -> None:
    """``-q/--quiet`` and ``-v/--verbose`` on an argparse parser (read by :func:`setup_from_args`)."""
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors: no progress, no stage messages")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="also debug messages, with times")


def setup_from_args(args: Any) -> None:
    """:func:`setup_logging` from the options :func:`add_verbosity_options` added."""
    setup_logging(-1 if getattr(args, "quiet", False) else int(getattr(args, "verbose", 0) or 0))

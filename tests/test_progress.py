"""Progress and stage messages: plain lines when the output is not a terminal, silence under --quiet."""

from __future__ import annotations

import io
import logging

import pytest

from gem import progress as progress_module
from gem.progress import LineProgress, logger, progress, setup_logging


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", fake)
    return fake


@pytest.fixture(autouse=True)
def default_logging():
    setup_logging(0)
    yield
    setup_logging(0)


def _stage_lines(clock, total, desc, unit, updates, each, seconds_per_update, **postfix):
    """The lines a stage of ``updates`` updates of ``each``, ``seconds_per_update`` apart, prints."""
    out = io.StringIO()
    with LineProgress(total, desc, unit=unit, stream=out) as bar:
        for _ in range(updates):
            clock.now += seconds_per_update
            bar.update(each)
            if postfix:
                bar.set_postfix(**postfix)
    assert "\r" not in out.getvalue()
    return out.getvalue().splitlines()


def test_a_slow_stage_prints_a_line_every_ten_percent_and_one_at_the_end(clock):
    lines = _stage_lines(clock, 100, "train", "step", 100, 1, 1.0, loss=1.5)
    assert len(lines) == 10  # 10 %, ..., 90 % and the closing 100 %
    assert lines[0] == "train: 10% (10/100 step), 10 s, about 1 min 30 s left, loss=1.5"
    assert lines[-1] == "train: 100% (100/100 step), 1 min 40 s, loss=1.5"


def test_a_fast_stage_prints_only_its_last_line(clock):
    assert _stage_lines(clock, 1000, "score", "img", 10, 100, 0.01) == ["score: 100% (1000/1000 img), 0 s"]


def test_a_long_wait_between_updates_still_reports_every_thirty_seconds(clock):
    out = io.StringIO()
    bar = LineProgress(1000, "evaluate", unit="metric", stream=out)
    clock.now += 31.0
    bar.update(1)  # 0.1 %: not a 10 % step, but 31 s since the last line
    assert out.getvalue().splitlines() == ["evaluate: 0% (1/1000 metric), 31 s, about 8 h 36 min left"]
    bar.close()
    assert len(out.getvalue().splitlines()) == 1  # nothing new to say


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    bar = progress(10, "x", stream=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress(10, "x", stream=io.StringIO()), LineProgress)


def test_quiet_silences_progress_and_stage_messages_but_not_warnings():
    err = io.StringIO()
    setup_logging(-1, stream=err)
    bar = progress(3, "train", stream=err)
    bar.update(3)
    bar.close()
    logger.info("data: loading")
    logger.warning("dropped a key")
    assert err.getvalue() == "dropped a key\n"


def test_verbose_adds_debug_messages_with_times():
    err = io.StringIO()
    setup_logging(1, stream=err)
    logger.debug("detail")
    assert "gem: detail" in err.getvalue()
    assert logger.level == logging.DEBUG


def test_auto_threads_leaves_the_cores_other_processes_keep_busy(monkeypatch):
    import os

    from gem.context import auto_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for load, expected in ((0.0, 4), (1.2, 3), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        threads, why = auto_threads()
        assert threads == expected and "4 core(s)" in why


def test_plain_lines_show_bytes_in_readable_units():
    import io

    from gem.progress import LineProgress

    stream = io.StringIO()
    bar = LineProgress(30_000_000, "get", unit="B", stream=stream, every_percent=50, at_most_every=0)
    bar.update(15_200_000)
    bar.close()
    assert "get: 51% (15.2/30.0 MB)" in stream.getvalue()
    stream = io.StringIO()
    with LineProgress(2_500_000_000, "get", unit="B", stream=stream) as bar:
        bar.update(500_000_000)
    assert "(0.5/2.5 GB)" in stream.getvalue()

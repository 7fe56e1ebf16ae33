"""The ``openai`` relation oracle: a multimodal LLM behind any OpenAI-compatible chat-completions API.

It works with OpenAI itself (the paper used GPT-4o) and with local or self-hosted servers that
speak the same protocol (vLLM, Ollama, LM Studio, llama.cpp's server): set ``base_url``, and
``api_key_env: null`` when the server needs no key.

Prompt modes
    ``per_image`` (default) asks for every attribute of one image in one request and reads a
    JSON object (n times fewer requests); ``per_attribute`` reproduces the paper's template, one
    request per image and attribute, and reads a single digit. Images are sent as base64
    ``data:image/png;base64,...`` URL parts.

Scheduling
    One stream over the whole scoring, no batch barrier: up to the adaptive concurrency limit
    of requests stay in flight (:mod:`gem_plugins.request_scheduler`: each 429 or refused
    connection lowers it by one, answers raise it back towards ``max_concurrency``), retries
    wait in a queue without holding a slot, a request slower than ``hedge_factor`` times the
    median reply (at least 1 s; at most one request in ten) is sent once more and the first
    answer kept, and each image's
    scores are handed on as soon as they are complete. ``submit: batch`` sends the whole scoring
    as one OpenAI Batch job instead (:mod:`gem_plugins.openai_batch`).

HTTP client
    The standard library (``urllib.request``) on a thread pool. The oracle sends small JSON
    POSTs, a few GETs and one multipart upload in batch mode, and counts, times and budgets every
    request itself; the ``openai`` package would add a dependency pinned against a fast-moving
    SDK, and its retries would have to be switched off and its exceptions mapped back, without
    removing that code. Proxies from the environment are honoured except for loopback servers.

Failures
    A free ``GET <base_url>/models`` comes first: a refused connection or DNS failure stops the
    run in seconds naming the URL, and so does a rejected key. 429, 408/409/425, 5xx, time-outs
    and connection errors are retried with exponential backoff and jitter (``backoff_base *
    2**attempt``, capped at ``backoff_max``), never sooner than ``Retry-After`` (seconds or an
    HTTP date, also capped). A reply that holds some of the asked attributes is used and only the
    missing ones are asked again; after ``max_retries`` retries what is still invalid is recorded
    as missing (NaN, never 0). When more than half of the first 16 replies hold no readable score
    the run stops and shows one. 401/403/404 stop the run at once (a wrong key, model or URL
    fails every request the same way), and so does a request that never got an HTTP response
    while no other request got one either (server gone): the error names the URL and the last
    error, rather than handing on an all-NaN score matrix. Other 4xx are not retried.
    ``max_requests`` caps the HTTP requests of the whole run (hedges included); once spent, the
    remaining scores are missing and a warning says how many.

The API key is read from the environment variable named by ``api_key_env`` when the oracle is
built; it is kept out of ``repr``, ``stats``, ``cache_key``, logs and error messages.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import heapq
import http.client
import io
import itertools
import ipaddress
import json
import logging
import math
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from datetime import timezone
from typing import Any, Hashable, Iterable, Iterator, Literal, Optional, Sequence, Union

import numpy as np

from gem import hookimpl
from gem.errors import GemError
from gem.interfaces import BuildContext, RelationOracle, ScoreRequest
from gem_plugins.openai_batch import BatchClient, split_lines
from gem_plugins.request_scheduler import AdaptiveConcurrency, LatencyTracker
from gem_plugins.prompts import (MAX_SCORE, MIN_SCORE, PROMPT_VERSION, attribute_prompt, image_prompt,
                                 parse_json_scores, parse_score)

log = logging.getLogger("gem.oracle.openai")

#: HTTP statuses worth retrying: time-outs, conflicts, rate limits, server errors (and all 5xx).
RETRY_STATUSES = frozenset({408, 409, 425, 429})
#: HTTP statuses that fail every request the same way: stop the run with a clear error.
FATAL_STATUSES = frozenset({401, 403, 404})


class OracleError(GemError, ValueError):
    """The oracle cannot work as configured (no key, server unreachable, key or model rejected).

    A :class:`gem.errors.GemError` so that the command line shows it as a one-line error a user can fix.
    """


@dataclass
class OpenAIOracleOptions:
    model: str = "gpt-4o"
    """Model name as the server knows it (``gpt-4o``, ``llava-hf/llava-1.5-7b-hf`` on vLLM, ...)."""
    base_url: str = "https://api.openai.com/v1"
    """API root; requests go to ``<base_url>/chat/completions``."""
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    """NAME of the environment variable that holds the key (never the key); null: send no key."""
    prompt_mode: Literal["per_image", "per_attribute"] = "per_image"
    """per_image: one request per image, JSON reply; per_attribute: the paper's one digit per request."""
    temperature: float = 0.0
    max_tokens: Optional[int] = None
    """Reply token limit; null: 16 per attribute request, 32 + 16 per attribute for per_image."""
    image_format: Literal["png", "jpeg"] = "png"
    image_detail: Optional[Literal["auto", "low", "high"]] = None
    """OpenAI's image ``detail``; null leaves it out (some servers reject it)."""
    timeout: float = 60.0
    """Seconds to wait for a reply before retrying."""
    max_concurrency: int = 8
    """Most requests in flight at once; fewer while the server answers 429 or refuses connections."""
    hedge_factor: Optional[float] = 4.0
    """A request slower than this many times the median reply (and at least 1 s) is sent once more
    and the first answer is kept, for at most 10 % of the requests; null: never (each hedge is one
    more paid request)."""
    preflight: bool = True
    """Ask GET <base_url>/models (free) before scoring, so a wrong URL or key fails in seconds."""
    structured: bool = True
    """per_image mode: ask for a JSON-schema reply (``response_format``, OpenAI and vLLM know it);
    a server that rejects it is asked without it for the rest of the run."""
    mode: Literal["text", "logprobs"] = "text"
    """text: read the digits of the reply; logprobs: also ask for the tokens' log-probabilities and
    read each score's digit distribution (kept in ``distributions``), as the llava oracle's logits mode."""
    score: Literal["argmax", "expected"] = "argmax"
    """logprobs mode: the most likely digit, or the distribution's expected value rounded."""
    submit: Literal["stream", "batch"] = "stream"
    """stream: requests sent as scoring goes; batch: the whole scoring as one OpenAI Batch job
    (half the price, no rate limits, done within 24 h; resumed, not paid twice, after a kill)."""
    batch_poll_seconds: float = 30.0
    """batch: seconds between two looks at the job's state."""
    batch_max_wait: Optional[float] = None
    """batch: stop waiting after this many seconds (a re-run picks the same job up); null: until it ends."""
    image_tokens: Optional[int] = None
    """Input tokens one image costs, for the cost estimate; null: OpenAI's rule for GPT-4o-class
    models (85, plus 170 per 512-pixel tile unless image_detail is low)."""
    price_per_million_tokens: Optional[Union[float, dict]] = None
    """Price for the cost estimate: one number (input and output alike) or {input: 2.5, output: 10}."""
    max_requests: Optional[int] = None
    """Budget of HTTP requests (retries included) for the run; null: no limit."""
    max_retries: int = 5
    """Retries of one request (errors, rate limits or invalid replies) before it counts as missing."""
    backoff_base: float = 1.0
    """First retry delay in seconds; doubles with every retry (with jitter)."""
    backoff_max: float = 60.0
    """Longest delay between retries, also the cap on a server's Retry-After."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be a model name, e.g. gpt-4o")
        parsed = urllib.parse.urlsplit(self.base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be an http(s) URL such as https://api.openai.com/v1, got {self.base_url!r}")
        if self.api_key_env is not None:
            if self.api_key_env.startswith(("sk-", "Bearer ")) or len(self.api_key_env) > 64:
                # Never echo the value: it is probably a key pasted into the recipe.
                raise ValueError("api_key_env must be the NAME of an environment variable holding the key "
                                 "(e.g. OPENAI_API_KEY), not the key itself; remove the key from the recipe")
            if self.api_key_env and not all(c.isalnum() or c == "_" for c in self.api_key_env):
                raise ValueError("api_key_env must be the name of an environment variable (letters, digits, _)")
        checks = {"timeout": self.timeout > 0, "max_concurrency": self.max_concurrency >= 1,
                  "max_retries": self.max_retries >= 0, "backoff_base": self.backoff_base >= 0,
                  "backoff_max": self.backoff_max >= 0, "temperature": self.temperature >= 0,
                  "max_requests": self.max_requests is None or self.max_requests >= 0,
                  "max_tokens": self.max_tokens is None or self.max_tokens >= 1,
                  "hedge_factor": self.hedge_factor is None or self.hedge_factor > 1,
                  "image_tokens": self.image_tokens is None or self.image_tokens >= 0,
                  "batch_poll_seconds": self.batch_poll_seconds > 0,
                  "batch_max_wait": self.batch_max_wait is None or self.batch_max_wait >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} is out of range: {getattr(self, name)!r}")
        self.prices()

    def prices(self) -> Optional[tuple[float, float]]:
        """(input, output) price per million tokens, or None when no price is set."""
        price = self.price_per_million_tokens
        if price is None:
            return None
        if isinstance(price, dict):
            if set(price) != {"input", "output"} or not all(isinstance(v, (int, float)) and v >= 0 for v in price.values()):
                raise ValueError("price_per_million_tokens must be a number or {input: <price>, output: <price>} "
                                 f"(prices >= 0), got {price!r}")
            return float(price["input"]), float(price["output"])
        if price < 0:
            raise ValueError(f"price_per_million_tokens must be >= 0, got {price!r}")
        return float(price), float(price)


class _Secret:
    """Holds the API key; its repr never shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<hidden>"

    __str__ = __repr__


class _TransportError(Exception):
    """No HTTP response: refused, reset, DNS failure, time-out."""

    def __init__(self, message: str, refused: bool = False, timed_out: bool = False):
        super().__init__(message)
        self.refused = refused
        self.timed_out = timed_out


class _StatusError(Exception):
    def __init__(self, status: int, message: str, retry_after: Optional[float]):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after = retry_after


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date); None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def digit_distribution(tokens: list, position: int) -> Optional[np.ndarray]:
    """Probabilities of the scores 0..5 at character ``position`` of a reply, from the chat API's
    ``logprobs.content`` (each token with its ``top_logprobs``); None when that token has no digit
    alternatives. Renormalised over the digits, like the llava oracle's logits mode."""
    offset = 0
    for token in tokens:
        text = str(token.get("token", ""))
        if offset <= position < offset + len(text):
            candidates = [token, *(token.get("top_logprobs") or [])]
            probs = np.zeros(MAX_SCORE - MIN_SCORE + 1)
            for candidate in candidates:
                digit = str(candidate.get("token", "")).strip()
                if digit.isdigit() and len(digit) == 1 and MIN_SCORE <= int(digit) <= MAX_SCORE:
                    probs[int(digit) - MIN_SCORE] = max(probs[int(digit) - MIN_SCORE],
                                                        math.exp(float(candidate.get("logprob", -math.inf))))
            return probs / probs.sum() if probs.sum() > 0 else None
        offset += len(text)
    return None


def image_tokens(width: int, height: int, detail: Optional[str] = None) -> int:
    """Input tokens of one image under OpenAI's documented rule for GPT-4o-class models: 85 at
    ``low`` detail; otherwise the image is scaled to fit 2048 x 2048, then its short side to at
    most 768, and each 512-pixel tile adds 170."""
    if detail == "low":
        return 85
    w, h = float(width), float(height)
    scale = min(1.0, 2048 / max(w, h))
    w, h = w * scale, h * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def encode_image(image: np.ndarray, fmt: str = "png") -> str:
    """A ``data:image/<fmt>;base64,...`` URL of a uint8 (H, W, 3) image."""
    from PIL import Image

    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    pil = Image.fromarray(array)
    if fmt == "jpeg":
        pil.convert("RGB").save(buf, format="JPEG", quality=95)
    else:
        pil.save(buf, format="PNG")
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class _Task:
    """One image (per_image) or one image-attribute pair (per_attribute) on its way to a score."""

    key: Hashable
    index: int
    image: np.ndarray
    prompt_attributes: list[str]
    got: dict[str, Optional[int]]
    url: Optional[str] = None
    tries: int = 0
    in_flight: int = 0
    first_sent: float = 0.0
    outcome: str = "invalid"
    last_error: str = ""
    hedge: bool = False
    hedges: int = 0
    queued: bool = False
    done: bool = False

    def missing(self) -> list[str]:
        return [a for a in self.prompt_attributes if self.got[a] is None]


@dataclass
class _Attempt:
    task: _Task
    submitted: float = 0.0
    started: Optional[float] = None
    straggler: bool = False


class OpenAIOracle(RelationOracle):
    """Scores attributes with a multimodal chat model behind an OpenAI-compatible API."""

    #: Replies looked at before deciding that the model's answers cannot be read at all.
    READABILITY_WINDOW = 16
    #: Largest share of the requests sent that may be hedges (a server that slows down as a
    #: whole must not double the bill).
    MAX_HEDGED = 0.1
    #: A hedge that is slow too is hedged once more, but no further.
    MAX_HEDGES_PER_TASK = 2
    #: Threads for requests that were hedged and still wait for their own reply.
    STRAGGLER_THREADS = 128

    def __init__(self, options: OpenAIOracleOptions, context: Optional[BuildContext] = None):
        self.options = options
        self._key: Optional[_Secret] = None
        if options.api_key_env:
            value = os.environ.get(options.api_key_env, "")
            if not value.strip():
                raise OracleError(
                    f"the openai oracle needs an API key in the environment variable {options.api_key_env}, "
                    f"which is unset or empty: export {options.api_key_env}=<your key> before the run, or set "
                    f"oracle.api_key_env to null for a local server that needs no key")
            self._key = _Secret(value.strip())
        self.root = options.base_url.rstrip("/")
        self.url = self.root + "/chat/completions"
        host = urllib.parse.urlsplit(options.base_url).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(host) else []
        self._opener = urllib.request.build_opener(*handlers)
        self.cache_key = self.key_for(options)
        # A straggler keeps its thread until it answers or times out while its hedge runs on
        # another, so the pool has room for many of them beyond the requests in flight.
        self._pool = ThreadPoolExecutor(max_workers=options.max_concurrency + self.STRAGGLER_THREADS,
                                        thread_name_prefix="gem-openai")
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "retries": 0, "hedged": 0, "failures": 0, "rate_limited": 0,
                        "server_errors": 0, "transport_errors": 0, "invalid_replies": 0, "prompt_tokens": 0,
                        "completion_tokens": 0, "budget_exhausted": 0, "no_logprobs": 0}
        self._concurrency = AdaptiveConcurrency(options.max_concurrency)
        self._latency = LatencyTracker(options.hedge_factor)
        self._ledger = Path(context.cache_dir) / "oracle_scores.sqlite" if context is not None else None
        self._checked = not options.preflight
        self._structured = options.structured
        self.distributions: dict[tuple[int, str], np.ndarray] = {}
        """logprobs mode: (image index, attribute) -> probabilities of the scores 0..5."""
        self._replies = self._unreadable = 0
        self._unreadable_example = ""
        self._last_response = -float("inf")
        self._budget_warned = False
        self.notes: list[str] = []

    def __repr__(self) -> str:
        o = self.options
        return (f"OpenAIOracle(model={o.model!r}, base_url={o.base_url!r}, prompt_mode={o.prompt_mode!r}, "
                f"api_key_env={o.api_key_env!r})")

    # -- public API -------------------------------------------------------------------------
    @staticmethod
    def key_for(options: OpenAIOracleOptions) -> str:
        """The score cache key of an oracle with these options (no oracle, no key needed)."""
        key = f"openai/{options.model}/{options.prompt_mode}"
        if options.mode == "logprobs":
            key += f"/logprobs-{options.score}"
        return f"{key}/{PROMPT_VERSION}"

    @staticmethod
    def estimate(options: OpenAIOracleOptions, asks: Sequence[tuple[tuple[int, int], Sequence[str]]]) -> dict[str, Any]:
        """Requests, input and output tokens and cost of asking, for each (image height and width,
        attributes) in ``asks``, what is missing; before retries and hedges. Sends nothing.

        Text tokens are counted as 4 characters each; replies as their usual length (a digit, or a
        JSON object of digits), not ``max_tokens``."""
        requests = input_tokens = output_tokens = 0
        for (height, width), attributes in asks:
            per_image = (options.image_tokens if options.image_tokens is not None
                         else image_tokens(width, height, options.image_detail))
            if options.prompt_mode == "per_image":
                prompts = [image_prompt(list(attributes))]
                replies = [json.dumps({a: 3 for a in attributes})]
            else:
                prompts = [attribute_prompt(a) for a in attributes]
                replies = ["3"] * len(attributes)
            requests += len(prompts)
            input_tokens += sum(math.ceil(len(p) / 4) + per_image for p in prompts)
            output_tokens += sum(math.ceil(len(r) / 4) + 1 for r in replies)
        prices = options.prices()
        cost = (input_tokens * prices[0] + output_tokens * prices[1]) / 1e6 if prices else None
        return {"requests": requests, "input_tokens": input_tokens, "output_tokens": output_tokens, "cost": cost,
                "prices": prices, "model": options.model}

    def score(self, images: np.ndarray, indices: np.ndarray, attributes: Sequence[str]) -> np.ndarray:
        attributes = tuple(attributes)
        scores = np.full((len(images), len(attributes)), np.nan)
        requests = (ScoreRequest(row, image, int(index), attributes)
                    for row, (image, index) in enumerate(zip(images, indices)))
        for row, values in self.score_stream(requests):
            scores[row] = values
        return scores

    def score_stream(self, requests: Iterable[ScoreRequest], batch_size: int = 32
                     ) -> Iterator[tuple[Hashable, np.ndarray]]:
        """Keep up to the adaptive concurrency limit of requests in flight over the whole stream.

        Each image's scores are yielded as soon as they are complete (or given up), retries wait
        in a queue without holding a slot, and a request much slower than the median is sent again
        (``hedge_factor``). ``batch_size`` is not used: there is no batch barrier.
        """
        if not self._checked:
            self._preflight()
        per_image = self.options.prompt_mode == "per_image"
        parts: dict[Hashable, list[_Task]] = {}
        values: dict[Hashable, dict[str, Optional[int]]] = {}
        order: dict[Hashable, tuple[str, ...]] = {}

        def tasks() -> Iterator[_Task]:
            for request in requests:
                order[request.key] = tuple(request.attributes)
                values[request.key] = {}
                groups = [list(request.attributes)] if per_image else [[a] for a in request.attributes]
                parts[request.key] = [_Task(request.key, int(request.index), request.image, g, {a: None for a in g})
                                      for g in groups]
                yield from list(parts[request.key])

        def finished(task: _Task) -> Optional[tuple[Hashable, np.ndarray]]:
            """Account for a task that is done; the image's scores once all its tasks are."""
            if task.done:
                return None
            task.done = True
            missing = len(task.missing())
            with self._lock:
                self._counts["budget_exhausted" if task.outcome == "budget" else "failures"] += missing
            if task.outcome == "budget" and missing:
                self._warn_budget()
            values[task.key].update(task.got)
            remaining = parts[task.key]
            remaining.remove(task)
            if remaining:
                return None
            del parts[task.key]
            got = values.pop(task.key)
            return task.key, np.array([np.nan if got.get(a) is None else got[a] for a in order.pop(task.key)],
                                      dtype=float)

        if self.options.submit == "batch":
            yield from self._score_batch(tasks(), finished)
        else:
            yield from self._schedule(tasks(), finished)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        # Stragglers whose hedge already answered are left to finish on their own time-out.
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the scheduler ----------------------------------------------------------------------
    def _schedule(self, source: Iterator[_Task], finished) -> Iterator[tuple[Hashable, np.ndarray]]:
        o = self.options
        ready: deque[_Task] = deque()
        waiting: list[tuple[float, int, _Task]] = []
        running: dict[Future, _Attempt] = {}
        ticket = itertools.count()
        exhausted = False
        self._concurrency.probing = True
        done_tasks: list[_Task] = []

        def retry_later(task: _Task, retry_after: Optional[float]) -> None:
            if task.in_flight or task.queued:  # its hedge (or the straggler it replaced) may still answer
                return
            if task.tries > o.max_retries:
                if task.outcome == "unreachable" and self._last_response < task.first_sent:
                    raise OracleError(f"openai oracle: cannot reach {self.url}: {task.last_error} (no answer to "
                                      f"any request since this one was first sent, {o.max_retries} retries)")
                done_tasks.append(task)
                return
            task.queued = True
            heapq.heappush(waiting, (time.monotonic() + self._delay(task.tries - 1, retry_after), next(ticket), task))

        try:
            while True:
                now = time.monotonic()
                while waiting and waiting[0][0] <= now:
                    ready.append(heapq.heappop(waiting)[2])
                active = sum(not a.straggler for a in running.values())
                while active < self._concurrency.limit:
                    if ready:
                        task = ready.popleft()
                    elif not exhausted:
                        task = next(source, None)
                        if task is None:
                            exhausted = True
                            self._concurrency.probing = False
                            continue
                    else:
                        break
                    task.queued = False
                    if task.done or not task.missing():  # answered while its hedge waited in the queue
                        continue
                    if not self._take_budget():
                        task.outcome = "budget"
                        if not task.in_flight:
                            done_tasks.append(task)
                        continue
                    if task.hedge:
                        task.hedge = False
                    else:
                        if task.tries:
                            with self._lock:
                                self._counts["retries"] += 1
                        task.tries += 1
                    if not task.first_sent:
                        task.first_sent = now
                    task.in_flight += 1
                    attempt = _Attempt(task, submitted=now)
                    running[self._pool.submit(self._attempt, attempt)] = attempt
                    active += 1
                for task in done_tasks:
                    item = finished(task)
                    if item is not None:
                        yield item
                done_tasks.clear()
                if exhausted and not ready and not waiting and all(a.task.done for a in running.values()):
                    return  # stragglers whose hedge answered are not waited for
                # A straggler is sent again once; it keeps running but no longer holds a slot.
                with self._lock:
                    room = self._counts["hedged"] < self.MAX_HEDGED * self._counts["requests"]
                late = self._latency.straggler_after() if room else float("inf")
                next_check = float("inf")
                for attempt in running.values():
                    if attempt.straggler or attempt.task.queued or attempt.task.hedges >= self.MAX_HEDGES_PER_TASK:
                        continue
                    due = (attempt.started or attempt.submitted) + late
                    if due <= now and attempt.started is not None:
                        attempt.straggler = True
                        attempt.task.hedge = attempt.task.queued = True
                        attempt.task.hedges += 1
                        ready.appendleft(attempt.task)
                        with self._lock:
                            self._counts["hedged"] += 1
                    else:
                        next_check = min(next_check, max(due, now + 0.01))
                active = sum(not a.straggler for a in running.values())
                if ready and active < self._concurrency.limit:
                    continue
                wake = min([next_check, waiting[0][0] if waiting else float("inf"), now + 1.0])
                timeout = max(0.0, wake - time.monotonic())
                if not running:
                    time.sleep(timeout)
                    continue
                done, _ = wait(list(running), timeout=timeout, return_when=FIRST_COMPLETED)
                for future in done:
                    attempt = running.pop(future)
                    self._settle(attempt, future, retry_later, done_tasks)
        finally:
            for future in running:
                future.cancel()

    def _attempt(self, attempt: _Attempt) -> tuple[str, float]:
        """One request for the attributes the task still misses (runs on a pool thread)."""
        attempt.started = time.monotonic()
        task = attempt.task
        if task.url is None:
            task.url = encode_image(task.image, self.options.image_format)
        missing = task.missing() or task.prompt_attributes
        prompt = self._prompt(missing)
        text, logprobs = self._chat(self._body(task.url, prompt, missing))
        return text, logprobs, time.monotonic() - attempt.started

    def _settle(self, attempt: _Attempt, future: Future, retry_later, done_tasks: list[_Task]) -> None:
        """Take in one finished request: merge its scores, or queue a retry, or give the task up."""
        task = attempt.task
        task.in_flight -= 1
        error = future.exception()
        now = time.monotonic()
        if error is None:
            text, logprobs, seconds = future.result()
            self._last_response = now
            self._latency.add(seconds)
            self._concurrency.on_success()
            if not task.missing():
                return  # a straggler answering after its hedge did
            if self._merge_reply(task, text, logprobs):
                done_tasks.append(task)
                return
            log.info("openai oracle: %s (try %d)", task.last_error, task.tries)
            retry_later(task, None)
            return
        if not task.missing():
            return
        if isinstance(error, _TransportError):
            task.outcome, task.last_error = "transport" if error.timed_out else "unreachable", str(error)
            if error.refused:
                self._concurrency.on_overload()
            log.info("openai oracle: %s: %s (try %d)", self.url, task.last_error, task.tries)
            retry_later(task, None)
        elif isinstance(error, _StatusError):
            self._last_response = now
            task.outcome, task.last_error = "status", str(error)
            log.info("openai oracle: %s from %s (try %d)", task.last_error, self.url, task.tries)
            if error.status in (400, 422) and self._structured and "response_format" in str(error).lower():
                self._structured = False  # this server does not take JSON-schema replies: ask as plain text
                log.info("openai oracle: %s rejects response_format; asking for plain JSON replies", self.url)
                task.tries -= 1
                retry_later(task, 0.0)
                return
            if error.status in FATAL_STATUSES:
                raise OracleError(f"openai oracle: {self.url} answered {task.last_error} "
                                  f"(check base_url, model {self.options.model!r} and the API key)") from None
            if error.status == 429:
                self._concurrency.on_overload()
            if error.status in RETRY_STATUSES or error.status >= 500:
                retry_later(task, error.retry_after)
            elif not task.in_flight:
                done_tasks.append(task)
        else:
            raise error

    def _merge_reply(self, task: _Task, text: str, logprobs: Optional[list]) -> bool:
        """Take the valid scores of one reply into the task; True when nothing is missing any more."""
        asked = task.missing()
        parsed = (parse_json_scores(text, asked) if self.options.prompt_mode == "per_image"
                  else {asked[0]: parse_score(text)})
        if self.options.mode == "logprobs":
            parsed = self._from_logprobs(task, text, logprobs, parsed)
        for attribute, value in parsed.items():
            if value is not None and task.got[attribute] is None:
                task.got[attribute] = value
        self._check_readable(text, any(v is not None for v in parsed.values()))
        if not task.missing():
            task.outcome = "ok"
            return True
        with self._lock:
            self._counts["invalid_replies"] += 1
        task.outcome, task.last_error = "invalid", f"no valid 0-5 score in the reply {text[:80]!r}"
        return False

    # -- batch mode ------------------------------------------------------------------------------
    def _score_batch(self, source: Iterator[_Task], finished) -> Iterator[tuple[Hashable, np.ndarray]]:
        """Every task as one line of a batch job (one job per input file the API's limits allow);
        what the jobs do not answer goes through the stream."""
        from gem.score_cache import ScoreCache, image_hash

        client = BatchClient(self._api)
        tasks = list(source)
        by_id: dict[str, list[_Task]] = {}
        for task in tasks:
            digest = hashlib.sha1(f"{image_hash(task.image)}/{','.join(task.prompt_attributes)}".encode()).hexdigest()
            by_id.setdefault(f"gem-{digest}", []).append(task)
        replies: dict[str, dict[str, Any]] = {}
        ledger = ScoreCache(self._ledger) if self._ledger is not None else None
        try:
            for batch_id, ids in ledger.open_batches(self.cache_key) if ledger is not None else []:
                if set(ids) & set(by_id):  # a job a killed run submitted: collect it, do not pay twice
                    log.info("openai oracle: collecting batch %s, submitted by an earlier run", batch_id)
                    replies.update(self._collect(client, batch_id))
                    ledger.close_batch(self.cache_key, batch_id)
            todo = [cid for cid in by_id if cid not in replies]
            lines = []
            for cid in todo:
                task = by_id[cid][0]
                if not self._take_budget():
                    for t in by_id[cid]:
                        t.outcome = "budget"
                    continue
                task.url = task.url or encode_image(task.image, self.options.image_format)
                attributes = task.prompt_attributes
                prompt = self._prompt(attributes)
                lines.append({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                              "body": self._body(task.url, prompt, attributes)})
            submitted = []
            for chunk in split_lines(lines):  # several jobs when one file would pass the API's limits
                batch_id = client.create(client.upload(chunk))
                if ledger is not None:
                    ledger.add_batch(self.cache_key, batch_id, [line["custom_id"] for line in chunk])
                log.info("openai oracle: submitted batch %s of %d requests", batch_id, len(chunk))
                submitted.append(batch_id)
            if submitted:
                log.info("openai oracle: waiting for %d batch job(s) (poll every %g s)", len(submitted),
                         self.options.batch_poll_seconds)
            for batch_id in submitted:
                replies.update(self._collect(client, batch_id))
                if ledger is not None:
                    ledger.close_batch(self.cache_key, batch_id)
        finally:
            if ledger is not None:
                ledger.close()
        leftover = []
        for cid, group in by_id.items():
            reply = replies.get(cid)
            text, logprobs = self._reply_text(reply) if reply is not None else ("", None)
            for task in group:
                task.tries = 1
                if task.outcome == "budget":
                    item = finished(task)
                elif reply is not None and self._merge_reply(task, text, logprobs):
                    item = finished(task)
                else:
                    leftover.append(task)
                    continue
                if item is not None:
                    yield item
        if leftover:
            log.warning("openai oracle: the batch left %d requests without a valid score; asking them one by one",
                        len(leftover))
            yield from self._schedule(iter(leftover), finished)

    def _collect(self, client: BatchClient, batch_id: str) -> dict[str, dict[str, Any]]:
        """Wait for a batch job and return its successful replies by custom_id."""
        def show(state: dict[str, Any]) -> None:
            counts = state.get("request_counts") or {}
            log.info("openai oracle: batch %s is %s (%s of %s requests done)", batch_id, state.get("status"),
                     counts.get("completed", "?"), counts.get("total", "?"))

        try:
            state = client.wait(batch_id, self.options.batch_poll_seconds, self.options.batch_max_wait, show)
        except TimeoutError as exc:
            raise OracleError(f"openai oracle: batch {batch_id} is still {exc} after batch_max_wait="
                              f"{self.options.batch_max_wait:g} s; run the same command again to keep waiting: the "
                              f"job is recorded in the score cache and will not be submitted twice") from None
        if state.get("status") != "completed":
            log.warning("openai oracle: batch %s ended %s; its answered requests are used, the rest asked again",
                        batch_id, state.get("status"))
        replies = client.results(state)
        for reply in replies.values():
            usage = reply.get("usage") or {}
            with self._lock:
                self._counts["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
                self._counts["completion_tokens"] += int(usage.get("completion_tokens") or 0)
        return replies

    def _check_readable(self, text: str, readable: bool) -> None:
        """Stop early when most of the first replies hold no score the parser can read."""
        with self._lock:
            if self._replies >= self.READABILITY_WINDOW:
                return
            self._replies += 1
            if not readable:
                self._unreadable += 1
                self._unreadable_example = self._unreadable_example or text
            decide = self._replies == self.READABILITY_WINDOW
        if decide and self._unreadable * 2 > self._replies:
            expected = ("a JSON object mapping each attribute to an integer 0-5, e.g. "
                        + '{"Smiling": 3, "Bangs": 0}' if self.options.prompt_mode == "per_image"
                        else "a single digit from 0 to 5")
            raise OracleError(
                f"openai oracle: {self._unreadable} of the first {self._replies} replies of model "
                f"{self.options.model!r} hold no score that can be read; expected {expected}; one reply was: "
                f"{self._redact(self._unreadable_example)[:300]!r}. Try another model or prompt_mode, or check "
                f"the server's chat template; scores read so far are kept in the cache")

    # -- HTTP ------------------------------------------------------------------------------------
    def _preflight(self) -> None:
        """One free request (GET /models) before scoring, so a wrong URL or key fails in seconds."""
        self._checked = True
        url = self.root + "/models"
        try:
            raw = self._request("GET", url, None, timeout=min(self.options.timeout, 10.0))
        except _TransportError as exc:
            if exc.timed_out:
                log.warning("openai oracle: %s did not answer within 10 s before scoring; trying anyway", url)
                return
            raise OracleError(f"openai oracle: cannot reach {self.options.base_url}: {exc} (GET {url} before "
                              f"scoring; is the server running and is oracle.base_url right?)") from None
        except _StatusError as exc:
            if exc.status in (401, 403):
                raise OracleError(f"openai oracle: {url} answered {exc} (check the API key in "
                                  f"{self.options.api_key_env})") from None
            return  # many local servers have no model list; the first request tells
        try:
            listed = [m.get("id") for m in json.loads(raw).get("data", []) if isinstance(m, dict)]
        except (ValueError, AttributeError):
            return
        if listed and self.options.model not in listed:
            log.warning("openai oracle: the server at %s does not list model %r (it lists %s)",
                        self.options.base_url, self.options.model, ", ".join(map(str, listed[:8])))

    def _prompt(self, attributes: list[str]) -> str:
        """The question of one request: every attribute (per_image) or the one asked (per_attribute)."""
        return image_prompt(attributes) if self.options.prompt_mode == "per_image" else attribute_prompt(attributes[0])

    def _body(self, url: str, prompt: str, attributes: list[str]) -> dict[str, Any]:
        o = self.options
        image_part: dict[str, Any] = {"url": url}
        if o.image_detail is not None:
            image_part["detail"] = o.image_detail
        max_tokens = o.max_tokens or (16 if o.prompt_mode == "per_attribute" else 32 + 16 * len(attributes))
        body = {"model": o.model, "temperature": o.temperature, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": [{"type": "text", "text": prompt},
                                                          {"type": "image_url", "image_url": image_part}]}]}
        if o.prompt_mode == "per_image" and self._structured:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "attribute_scores", "strict": True,
                "schema": {"type": "object", "additionalProperties": False, "required": list(attributes),
                           "properties": {a: {"type": "integer", "enum": list(range(MIN_SCORE, MAX_SCORE + 1))}
                                          for a in attributes}}}}
        if o.mode == "logprobs":
            body["logprobs"], body["top_logprobs"] = True, 10
        return body

    def _from_logprobs(self, task: _Task, text: str, logprobs: Optional[list],
                       parsed: dict[str, Optional[int]]) -> dict[str, Optional[int]]:
        """Each parsed score replaced by the argmax or expected value of its digit's distribution."""
        out = dict(parsed)
        for attribute, value in parsed.items():
            if value is None:
                continue
            if self.options.prompt_mode == "per_image":
                match = re.search(r'"' + re.escape(attribute) + r'"\s*:\s*"?(\d)', text, re.IGNORECASE)
            else:
                match = re.search(r"(\d)", text)
            probs = digit_distribution(logprobs, match.start(1)) if match and logprobs else None
            if probs is None:
                with self._lock:
                    self._counts["no_logprobs"] += 1
                continue
            self.distributions[task.index, attribute] = probs
            levels = np.arange(MIN_SCORE, MAX_SCORE + 1)
            out[attribute] = int(np.rint(probs @ levels)) if self.options.score == "expected" else int(np.argmax(probs))
        return out

    def _take_budget(self) -> bool:
        with self._lock:
            limit = self.options.max_requests
            if limit is not None and self._counts["requests"] >= limit:
                return False
            self._counts["requests"] += 1
            return True

    def _warn_budget(self) -> None:
        with self._lock:
            if self._budget_warned:
                return
            self._budget_warned = True
        message = (f"openai oracle: the request budget max_requests={self.options.max_requests} is spent; "
                   f"the remaining scores are recorded as missing (stats()['budget_exhausted'] counts them)")
        self.notes.append(message)
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _delay(self, attempt: int, retry_after: Optional[float]) -> float:
        o = self.options
        backoff = min(o.backoff_base * (2 ** attempt), o.backoff_max) * (0.5 + 0.5 * random.random())
        if retry_after is not None:  # not sooner than the server asks, nor later than backoff_max
            return min(max(retry_after, backoff), o.backoff_max)
        return backoff

    def _redact(self, text: str) -> str:
        if self._key is not None and self._key.get():
            text = text.replace(self._key.get(), "<hidden>")
        return text

    def _api(self, method: str, path: str, body: Optional[dict[str, Any]] = None, raw: Optional[bytes] = None,
             content_type: Optional[str] = None) -> bytes:
        """A request to ``<base_url><path>``; HTTP errors become :class:`OracleError`."""
        try:
            return self._request(method, self.root + path, body, self.options.timeout, raw, content_type)
        except (_StatusError, _TransportError) as exc:
            raise OracleError(f"openai oracle: {method} {self.root}{path}: {exc}") from None

    def _request(self, method: str, url: str, body: Optional[dict[str, Any]], timeout: float,
                 raw: Optional[bytes] = None, content_type: Optional[str] = None) -> bytes:
        """One HTTP request (a JSON ``body``, or ``raw`` bytes of ``content_type``); the raw reply,
        or _TransportError / _StatusError."""
        headers = {"Accept": "application/json"}
        if body is not None or raw is not None:
            headers["Content-Type"] = content_type or "application/json"
        if self._key is not None:
            headers["Authorization"] = "Bearer " + self._key.get()
        data = json.dumps(body).encode("utf-8") if body is not None else raw
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = exc.read().decode("utf-8", "replace")
                message = json.loads(detail).get("error", {}).get("message", detail)
            except (ValueError, AttributeError, OSError, http.client.HTTPException):
                message = str(exc.reason)
            retry = parse_retry_after(exc.headers.get("Retry-After")) if exc.headers else None
            if retry is None and exc.headers and exc.headers.get("retry-after-ms"):
                try:
                    retry = float(exc.headers["retry-after-ms"]) / 1000
                except ValueError:
                    retry = None
            if exc.code == 429:
                with self._lock:
                    self._counts["rate_limited"] += 1
            elif exc.code >= 500:
                with self._lock:
                    self._counts["server_errors"] += 1
            raise _StatusError(exc.code, self._redact(str(message))[:300], retry) from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
                http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            timed_out = isinstance(reason, (socket.timeout, TimeoutError))
            refused = isinstance(reason, ConnectionRefusedError)
            if timed_out:
                reason = f"timed out after {timeout:g} s"
            elif isinstance(reason, OSError) and reason.strerror:
                reason = reason.strerror
            with self._lock:
                self._counts["transport_errors"] += 1
            raise _TransportError(self._redact(str(reason)), refused=refused, timed_out=timed_out) from None

    def _chat(self, body: dict[str, Any]) -> tuple[str, Optional[list]]:
        """POST one chat completion; the reply's text ("" when the reply has none) and its
        ``logprobs.content`` tokens (None when absent)."""
        raw = self._request("POST", self.url, body, self.options.timeout)
        try:
            reply = json.loads(raw)
            usage = reply.get("usage") or {}
            with self._lock:
                self._counts["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
                self._counts["completion_tokens"] += int(usage.get("completion_tokens") or 0)
        except (ValueError, TypeError, AttributeError):
            return "", None
        return self._reply_text(reply)

    @staticmethod
    def _reply_text(reply: Any) -> tuple[str, Optional[list]]:
        """The text and the ``logprobs.content`` tokens of a chat-completion reply body."""
        try:
            choice = reply["choices"][0]
            content = choice["message"].get("content")
            tokens = (choice.get("logprobs") or {}).get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return "", None
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return (content if isinstance(content, str) else ""), (tokens if isinstance(tokens, list) else None)


@hookimpl
def gem_register_oracles(register):
    register("openai", OpenAIOracle, options=OpenAIOracleOptions,
             description="a multimodal LLM behind any OpenAI-compatible chat-completions API (GPT-4o, vLLM, Ollama ...)")

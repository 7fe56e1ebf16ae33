"""The ``openai`` relation oracle: a multimodal LLM behind any OpenAI-compatible chat-completions API.

It works with OpenAI itself (the paper used GPT-4o) and with local or self-hosted servers that
speak the same protocol (vLLM, Ollama, LM Studio, llama.cpp's server): set ``base_url``, and
``api_key_env: null`` when the server needs no key.

Prompt modes
    ``per_image`` (default) asks for every attribute of one image in one request and reads a
    JSON object (n times fewer requests); ``per_attribute`` reproduces the paper's template, one
    request per image and attribute, and reads a single digit. Images are sent as base64
    ``data:image/png;base64,...`` URL parts.

HTTP client
    The standard library (``urllib.request``) on a ``concurrent.futures.ThreadPoolExecutor``
    bounded by ``max_concurrency``. The oracle sends one small JSON POST per request, so it
    needs nothing that ``httpx`` or the ``openai`` package would add, and neither is installed
    with gem (``httpx`` is not a dependency of anything gem needs here): a standard-library
    client means no extra to install, no version pinning against a fast-moving SDK, and full
    control of retries, ``Retry-After`` and the request budget, which the oracle must count
    itself anyway. Proxies from the environment are honoured except for loopback servers.

Failures
    429, 408/409/425, 5xx, time-outs and connection errors are retried with exponential
    backoff and jitter (``backoff_base * 2**attempt``, capped at ``backoff_max``), honouring
    ``Retry-After`` (seconds or an HTTP date, also capped). A reply that is not a valid 0-5 score
    for every attribute is asked again; after ``max_retries`` retries what is still invalid is
    recorded as missing (NaN, never 0). 401/403/404 stop the run at once (a wrong key, model
    or URL fails every request the same way), and so does a batch in which every request
    failed without any HTTP response (server unreachable): the error names the URL and the
    last error, rather than handing on an all-NaN score matrix. Other 4xx are not retried. ``max_requests``
    caps the HTTP requests of the whole run; once spent, the remaining scores are missing and
    a warning says how many.

The API key is read from the environment variable named by ``api_key_env`` when the oracle is
built; it is kept out of ``repr``, ``stats``, ``cache_key``, logs and error messages.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import ipaddress
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timezone
from typing import Any, Literal, Optional, Sequence

import numpy as np

from gem import hookimpl
from gem.errors import GemError
from gem.interfaces import BuildContext, RelationOracle
from gem_plugins.prompts import PROMPT_VERSION, attribute_prompt, image_prompt, parse_json_scores, parse_score

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
    """Requests in flight at once."""
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
                  "max_tokens": self.max_tokens is None or self.max_tokens >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} is out of range: {getattr(self, name)!r}")


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


class OpenAIOracle(RelationOracle):
    """Scores attributes with a multimodal chat model behind an OpenAI-compatible API."""

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
        self.url = options.base_url.rstrip("/") + "/chat/completions"
        host = urllib.parse.urlsplit(options.base_url).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(host) else []
        self._opener = urllib.request.build_opener(*handlers)
        self.cache_key = f"openai/{options.model}/{options.prompt_mode}/{PROMPT_VERSION}"
        self._pool = ThreadPoolExecutor(max_workers=options.max_concurrency, thread_name_prefix="gem-openai")
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "retries": 0, "failures": 0, "rate_limited": 0, "server_errors": 0,
                        "transport_errors": 0, "invalid_replies": 0, "prompt_tokens": 0,
                        "completion_tokens": 0, "budget_exhausted": 0}
        self._budget_warned = False
        self.notes: list[str] = []

    def __repr__(self) -> str:
        o = self.options
        return (f"OpenAIOracle(model={o.model!r}, base_url={o.base_url!r}, prompt_mode={o.prompt_mode!r}, "
                f"api_key_env={o.api_key_env!r})")

    # -- public API -------------------------------------------------------------------------
    def score(self, images: np.ndarray, indices: np.ndarray, attributes: Sequence[str]) -> np.ndarray:
        attributes = list(attributes)
        scores = np.full((len(images), len(attributes)), np.nan)
        if len(images) == 0 or not attributes:
            return scores
        urls = list(self._pool.map(lambda image: encode_image(image, self.options.image_format), list(images)))
        if self.options.prompt_mode == "per_image":
            tasks = [(row, list(range(len(attributes))), image_prompt(attributes)) for row in range(len(images))]
        else:
            prompts = [attribute_prompt(a) for a in attributes]
            tasks = [(row, [col], prompts[col]) for row in range(len(images)) for col in range(len(attributes))]
        futures = [self._pool.submit(self._run_task, urls[row], prompt, [attributes[c] for c in cols])
                   for row, cols, prompt in tasks]
        try:
            outcomes = [f.result() for f in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        budget_missing = 0
        for (row, cols, _), (values, outcome, _) in zip(tasks, outcomes):
            for col in cols:
                value = values.get(attributes[col])
                if value is not None:
                    scores[row, col] = value
            missing = sum(values.get(attributes[c]) is None for c in cols)
            if outcome == "budget":
                budget_missing += missing
        with self._lock:
            self._counts["failures"] += int(np.isnan(scores).sum()) - budget_missing
            self._counts["budget_exhausted"] += budget_missing
        if budget_missing:
            self._warn_budget()
        if all(o[1] == "transport" for o in outcomes):
            raise OracleError(f"openai oracle: cannot reach {self.url}: {outcomes[-1][2]} "
                              f"(all {len(outcomes)} requests of this batch failed, "
                              f"{self.options.max_retries} retries each)")
        if all(o[1] in ("transport", "status") for o in outcomes):
            log.warning("openai oracle: every request of this batch to %s failed; last error: %s; "
                        "its scores are recorded as missing", self.url, outcomes[-1][2])
        return scores

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- one image (per_image) or one image-attribute pair (per_attribute) -------------------
    def _run_task(self, url: str, prompt: str, attributes: list[str]) -> tuple[dict[str, Optional[int]], str, str]:
        """Ask until every attribute has a valid score or the retries are spent.

        Returns the scores (None = missing), the outcome (``ok``, ``invalid``, ``transport``,
        ``status``, ``budget``) and the last error message.
        """
        got: dict[str, Optional[int]] = {a: None for a in attributes}
        body = self._body(url, prompt, len(attributes))
        outcome, last_error = "invalid", ""
        for attempt in range(self.options.max_retries + 1):
            if not self._take_budget():
                return got, "budget", "request budget spent"
            if attempt:
                with self._lock:
                    self._counts["retries"] += 1
            retry_after: Optional[float] = None
            try:
                text = self._post(body)
            except _TransportError as exc:
                outcome, last_error = "transport", str(exc)
                log.info("openai oracle: %s: %s (attempt %d)", self.url, last_error, attempt + 1)
            except _StatusError as exc:
                outcome, last_error, retry_after = "status", str(exc), exc.retry_after
                log.info("openai oracle: %s from %s (attempt %d)", last_error, self.url, attempt + 1)
                if exc.status in FATAL_STATUSES:
                    raise OracleError(f"openai oracle: {self.url} answered {last_error} "
                                      f"(check base_url, model {self.options.model!r} and the API key)") from None
                if not (exc.status in RETRY_STATUSES or exc.status >= 500):
                    return got, outcome, last_error
            else:
                parsed = (parse_json_scores(text, attributes) if self.options.prompt_mode == "per_image"
                          else {attributes[0]: parse_score(text)})
                for attribute, value in parsed.items():
                    if got[attribute] is None:
                        got[attribute] = value
                if all(v is not None for v in got.values()):
                    return got, "ok", ""
                with self._lock:
                    self._counts["invalid_replies"] += 1
                outcome, last_error = "invalid", f"no valid 0-5 score in the reply {text[:80]!r}"
                log.info("openai oracle: %s (attempt %d)", last_error, attempt + 1)
            if attempt < self.options.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        return got, outcome, last_error

    def _body(self, url: str, prompt: str, n_attributes: int) -> dict[str, Any]:
        o = self.options
        image_part: dict[str, Any] = {"url": url}
        if o.image_detail is not None:
            image_part["detail"] = o.image_detail
        max_tokens = o.max_tokens or (16 if o.prompt_mode == "per_attribute" else 32 + 16 * n_attributes)
        return {"model": o.model, "temperature": o.temperature, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": [{"type": "text", "text": prompt},
                                                          {"type": "image_url", "image_url": image_part}]}]}

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
        if retry_after is not None:
            return min(retry_after, o.backoff_max)
        cap = min(o.backoff_base * (2 ** attempt), o.backoff_max)
        return cap * (0.5 + 0.5 * random.random())

    def _redact(self, text: str) -> str:
        if self._key is not None and self._key.get():
            text = text.replace(self._key.get(), "<hidden>")
        return text

    def _post(self, body: dict[str, Any]) -> str:
        """POST one chat completion; the reply's text, or _TransportError / _StatusError."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key is not None:
            headers["Authorization"] = "Bearer " + self._key.get()
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers,
                                         method="POST")
        try:
            with self._opener.open(request, timeout=self.options.timeout) as response:
                raw = response.read()
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
            if isinstance(reason, (socket.timeout, TimeoutError)):
                reason = f"timed out after {self.options.timeout:g} s"
            elif isinstance(reason, OSError) and reason.strerror:
                reason = reason.strerror
            with self._lock:
                self._counts["transport_errors"] += 1
            raise _TransportError(self._redact(str(reason))) from None
        try:
            reply = json.loads(raw)
            usage = reply.get("usage") or {}
            with self._lock:
                self._counts["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
                self._counts["completion_tokens"] += int(usage.get("completion_tokens") or 0)
            content = reply["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return ""
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""


@hookimpl
def gem_register_oracles(register):
    register("openai", OpenAIOracle, options=OpenAIOracleOptions,
             description="a multimodal LLM behind any OpenAI-compatible chat-completions API (GPT-4o, vLLM, Ollama ...)")

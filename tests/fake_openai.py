"""A scripted, in-process fake of an OpenAI-compatible chat-completions server (standard library only).

``with FakeOpenAI(attributes, scorer) as server:`` starts a ``ThreadingHTTPServer`` on
127.0.0.1 (a free port) in a thread and stops it on exit; ``server.base_url`` is the
``.../v1`` URL an oracle talks to. A normal answer is computed from the request: the server
decodes the image part (a base64 data URL) and asks ``scorer(attribute, image)`` for the score of
each attribute named in the prompt, answering one digit (one attribute named) or a JSON object
(several). Every request is recorded (path, headers, JSON body) in ``server.requests``, and
``server.max_in_flight`` is the most requests it was answering at once.

Behaviours other than a normal answer are scripted: ``server.script(["429", "ok"])`` makes the
next requests, in arrival order, answer as listed (then normally again); ``server.default`` is
what unscripted requests get. Behaviours:

``ok``           a normal answer (with ``usage``)
``429``          HTTP 429 with ``Retry-After: <server.retry_after>``
``500``          HTTP 500 with an OpenAI-style error body
``slow``         sleeps ``server.slow_seconds`` before answering normally (client time-outs)
``garbage``      200 with a reply that holds no score
``out_of_range`` 200 with the score 7 for every attribute
``401``          HTTP 401 (bad key)
``tail``         like ``ok``, but ``server.tail_fraction`` of them (at random) sleep ``server.tail_seconds``
``partial``      200 with a JSON object that holds only the first asked attribute

A request with ``response_format`` gets a bare JSON object, or HTTP 400 when
``server.structured`` is False (as servers without JSON-schema support answer). A request with
``logprobs`` gets ``logprobs.content``: one token per character, and for a digit the top
alternatives ``server.digit_probs(digit)`` (default: 0.7 on the digit, 0.3 on the next one).

The Batch API: ``POST /v1/files`` (multipart, purpose ``batch``) stores an upload in
``server.files``; ``POST /v1/batches`` makes a job in ``server.batches``; ``GET /v1/batches/{id}``
reports it ``in_progress`` until it has been polled ``server.batch_polls`` times (forever while
``server.batch_hold``), then answers every line as a chat request would be answered and reports
it ``completed`` with an output file; ``GET /v1/files/{id}/content`` downloads a file.

``server.capacity`` (None: unlimited) is how many requests it answers at once; one more is
answered 429 at once, as a rate-limited API does. ``GET /v1/models`` lists ``server.models``
(``server.models_status`` other than 200 answers that status instead) and is counted in
``server.model_lists``, not in ``server.requests``.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Sequence

import numpy as np

Scorer = Callable[[str, np.ndarray], int]


def table_scorer(table: dict[str, int]) -> Scorer:
    """A scorer that answers a fixed score per attribute, whatever the image."""
    return lambda attribute, image: table[attribute]


def decode_data_url(url: str) -> np.ndarray:
    """The uint8 (H, W, 3) pixels of a ``data:image/...;base64,`` URL."""
    from PIL import Image

    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError(f"not a base64 image data URL: {header[:40]!r}")
    with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
        return np.asarray(image.convert("RGB"))


def request_parts(body: dict) -> tuple[str, list[str]]:
    """The prompt text and the image URLs of a chat-completions request body."""
    texts, urls = [], []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                urls.append(part["image_url"]["url"])
    return "\n".join(texts), urls


class FakeOpenAI:
    """The fake server; a context manager that starts and stops it."""

    def __init__(self, attributes: Sequence[str], scorer: Optional[Scorer] = None):
        self.attributes = list(attributes)
        self.scorer = scorer or table_scorer({a: i % 6 for i, a in enumerate(self.attributes)})
        self.default = "ok"
        self.retry_after = "0"
        self.slow_seconds = 1.0
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.behaviours: list[str] = []
        self.capacity: Optional[int] = None
        self.tail_fraction = 0.05
        self.tail_seconds = 30.0
        self.models = ["fake-vision"]
        self.models_status = 200
        self.structured = True
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_polls = 1
        self.batch_hold = False
        self.digit_probs = lambda d: {d: 0.7, min(d + 1, 5) if d < 5 else d - 1: 0.3}
        self.model_lists = 0
        self._random = np.random.default_rng(0)
        self._script: list[str] = []
        self._lock = threading.Lock()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- control ---------------------------------------------------------------------------
    def script(self, behaviours: Sequence[str]) -> None:
        with self._lock:
            self._script.extend(behaviours)

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> "FakeOpenAI":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                if self.path.startswith(("/v1/files", "/v1/batches")):
                    fake._batch_api(self)
                else:
                    fake._handle(self)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.startswith(("/v1/files", "/v1/batches")):
                    fake._batch_api(self)
                else:
                    fake._list_models(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- answering --------------------------------------------------------------------------
    def _next_behaviour(self) -> str:
        with self._lock:
            behaviour = self._script.pop(0) if self._script else self.default
            self.behaviours.append(behaviour)
            return behaviour

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with self._lock:
            self.requests.append({"path": handler.path, "headers": dict(handler.headers.items()), "body": body})
        behaviour = self._next_behaviour()
        with self._lock:
            if self.capacity is not None and self.in_flight >= self.capacity:
                behaviour = "over_capacity"
            else:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
        counted = True
        if behaviour == "over_capacity":
            return self._send(handler, 429, {"error": {"message": "Too many requests in flight", "type": "requests"}},
                              {"Retry-After": self.retry_after})
        try:
            if handler.path.rstrip("/") != "/v1/chat/completions" or body is None:
                return self._send(handler, 404, {"error": {"message": f"no route {handler.path}"}})
            if behaviour == "429":
                return self._send(handler, 429, {"error": {"message": "Rate limit reached", "type": "requests"}},
                                  {"Retry-After": self.retry_after})
            if behaviour == "500":
                return self._send(handler, 500, {"error": {"message": "The server had an error", "type": "server_error"}})
            if behaviour == "401":
                return self._send(handler, 401, {"error": {"message": "Incorrect API key provided", "type": "auth"}})
            if body.get("response_format") and not self.structured:
                return self._send(handler, 400, {"error": {"message": "response_format is not supported by this "
                                                                       "model", "type": "invalid_request_error"}})
            if behaviour == "slow":
                time.sleep(self.slow_seconds)
            if behaviour == "tail":
                with self._lock:
                    late = self._random.random() < self.tail_fraction
                time.sleep(self.tail_seconds if late else self.slow_seconds)
            text = self._answer(body, behaviour)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
            if body.get("logprobs"):
                choice["logprobs"] = {"content": self._logprobs(text)}
            reply = {"id": "chatcmpl-fake", "object": "chat.completion", "model": body.get("model"),
                     "choices": [choice],
                     "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105}}
            # Counted out before the reply is written: a client that sends its next request as
            # soon as it reads this one is not one over.
            with self._lock:
                self.in_flight -= 1
            counted = False
            self._send(handler, 200, reply)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (time-out)
            pass
        finally:
            if counted:
                with self._lock:
                    self.in_flight -= 1

    def _answer(self, body: dict, behaviour: str) -> str:
        if behaviour == "garbage":
            return "I am sorry, I cannot help with rating this picture."
        text, urls = request_parts(body)
        named = [a for a in self.attributes if f'"{a}"' in text]
        image = decode_data_url(urls[0])
        if behaviour == "partial":
            named = named[:1]
        scores = {a: (7 if behaviour == "out_of_range" else int(self.scorer(a, image))) for a in named}
        if len(named) == 1 and "JSON" not in text and behaviour != "partial":
            return str(scores[named[0]])
        if body.get("response_format"):
            return json.dumps(scores)
        return "Here are the scores:\n```json\n" + json.dumps(scores) + "\n```"

    def _batch_api(self, handler: BaseHTTPRequestHandler) -> None:
        from email.parser import BytesParser
        from email.policy import default

        path = handler.path.rstrip("/")
        raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        with self._lock:
            if handler.command == "POST" and path == "/v1/files":
                message = BytesParser(policy=default).parsebytes(
                    b"Content-Type: " + handler.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
                parts = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                         for part in message.iter_parts()}
                if parts.get("purpose") != b"batch" or "file" not in parts:
                    return self._send(handler, 400, {"error": {"message": "purpose batch and a file are required"}})
                file_id = f"file-{len(self.files)}"
                self.files[file_id] = parts["file"]
                return self._send(handler, 200, {"id": file_id, "object": "file", "purpose": "batch",
                                                 "bytes": len(parts["file"])})
            if handler.command == "POST" and path == "/v1/batches":
                body = json.loads(raw)
                if body.get("input_file_id") not in self.files or body.get("endpoint") != "/v1/chat/completions":
                    return self._send(handler, 400, {"error": {"message": "bad batch request"}})
                batch_id = f"batch_{len(self.batches)}"
                lines = self.files[body["input_file_id"]].decode().splitlines()
                self.batches[batch_id] = {"id": batch_id, "object": "batch", "status": "validating", "polls": 0,
                                          "lines": [json.loads(line) for line in lines if line.strip()],
                                          "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
                return self._send(handler, 200, self._public(self.batches[batch_id]))
            if handler.command == "GET" and path.startswith("/v1/batches/"):
                batch = self.batches.get(path.rsplit("/", 1)[1])
                if batch is None:
                    return self._send(handler, 404, {"error": {"message": "no such batch"}})
                batch["polls"] += 1
                if batch["status"] != "completed":
                    batch["status"] = "in_progress"
                    if batch["polls"] >= self.batch_polls and not self.batch_hold:
                        self._complete(batch)
                return self._send(handler, 200, self._public(batch))
            if handler.command == "GET" and path.startswith("/v1/files/") and path.endswith("/content"):
                data = self.files.get(path.split("/")[3])
                if data is None:
                    return self._send(handler, 404, {"error": {"message": "no such file"}})
                handler.send_response(200)
                handler.send_header("Content-Type", "application/jsonl")
                handler.send_header("Content-Length", str(len(data)))
                handler.end_headers()
                handler.wfile.write(data)
                return None
        return self._send(handler, 404, {"error": {"message": f"no route {handler.path}"}})

    def _complete(self, batch: dict[str, Any]) -> None:
        out = []
        for line in batch["lines"]:
            behaviour = self._script.pop(0) if self._script else self.default
            if behaviour in ("500", "429"):
                out.append({"custom_id": line["custom_id"], "response": {"status_code": int(behaviour), "body": {}}})
                continue
            text = self._answer(line["body"], behaviour)
            out.append({"custom_id": line["custom_id"], "response": {"status_code": 200, "body": {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 5}}}})
        file_id = f"file-{len(self.files)}"
        self.files[file_id] = "".join(json.dumps(record) + "\n" for record in out).encode()
        batch.update(status="completed", output_file_id=file_id,
                     request_counts={"total": len(out), "completed": len(out), "failed": 0})

    @staticmethod
    def _public(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k not in ("lines", "polls")}

    def _logprobs(self, text: str) -> list[dict[str, Any]]:
        import math

        tokens = []
        for char in text:
            top = [{"token": char, "logprob": 0.0}]
            if char.isdigit() and int(char) <= 5:
                top = [{"token": str(d), "logprob": math.log(p)} for d, p in self.digit_probs(int(char)).items()]
            tokens.append({"token": char, "logprob": top[0]["logprob"], "top_logprobs": top})
        return tokens

    def _list_models(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.model_lists += 1
        if handler.path.rstrip("/") != "/v1/models":
            return self._send(handler, 404, {"error": {"message": f"no route {handler.path}"}})
        if self.models_status != 200:
            return self._send(handler, self.models_status, {"error": {"message": "model list refused"}})
        self._send(handler, 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload: dict,
              headers: Optional[dict[str, str]] = None) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)
        handler.wfile.flush()


def closed_port_url() -> str:
    """A ``http://127.0.0.1:<port>/v1`` URL on which nothing listens."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


__all__ = ["FakeOpenAI", "table_scorer", "decode_data_url", "request_parts", "closed_port_url"]

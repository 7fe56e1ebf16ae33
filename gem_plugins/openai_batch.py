"""The OpenAI Batch API as the openai oracle's ``submit: batch``: one job for the whole scoring.

A batch costs half the price of the same requests sent one by one and is not rate limited, at
the price of waiting (up to the 24-hour completion window). The steps, with the endpoints the
OpenAI API documents: upload the requests as a JSONL file (``POST /files``, purpose ``batch``),
create the job (``POST /batches``), poll it (``GET /batches/{id}``) and download its output
(``GET /files/{output_file_id}/content``): one JSON line per request, matched by ``custom_id``.

:class:`BatchClient` only speaks HTTP through the oracle's request function, so the oracle keeps
its key hygiene, time-outs and error messages.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Optional

#: A batch that reached one of these states will not change any more.
FINAL_STATES = frozenset({"completed", "failed", "expired", "cancelled"})

#: The OpenAI Batch API's limits on one input file: 50,000 requests and 200 MB.
MAX_REQUESTS_PER_FILE = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024

#: ``request(method, path, json_body, raw_body, content_type) -> bytes``; path relative to base_url.
Requester = Callable[..., bytes]


def jsonl_line(line: dict[str, Any]) -> bytes:
    return (json.dumps(line, separators=(",", ":")) + "\n").encode("utf-8")


def split_lines(lines: list[dict[str, Any]], max_requests: Optional[int] = None,
                max_bytes: Optional[int] = None) -> list[list[dict[str, Any]]]:
    """Cut the requests of one scoring into input files within the API's limits, in order.

    A CelebA scoring (200,000 images) is several files: 50,000 requests at most each, and at most
    ``max_bytes`` of JSONL (a 64×64 PNG in base64 is some kilobytes, so the byte limit usually
    comes first). The limits default to :data:`MAX_REQUESTS_PER_FILE` and :data:`MAX_FILE_BYTES`.
    A single request larger than ``max_bytes`` is a ValueError.
    """
    max_requests = max_requests or MAX_REQUESTS_PER_FILE
    max_bytes = max_bytes or MAX_FILE_BYTES
    files: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for line in lines:
        n = len(jsonl_line(line))
        if n > max_bytes:
            raise ValueError(f"one batch request is {n} bytes, more than a batch file may hold ({max_bytes})")
        if current and (len(current) >= max_requests or size + n > max_bytes):
            files.append(current)
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        files.append(current)
    return files


class BatchClient:
    """Files and batches endpoints of an OpenAI-compatible API."""

    def __init__(self, request: Requester):
        self._request = request

    def upload(self, lines: list[dict[str, Any]]) -> str:
        """Upload requests as a JSONL file for a batch; its file id."""
        payload = b"".join(jsonl_line(line) for line in lines)
        boundary = f"gem-{uuid.uuid4().hex}"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"gem-scores.jsonl\"\r\n"
                f"Content-Type: application/jsonl\r\n\r\n").encode("utf-8") + payload + f"\r\n--{boundary}--\r\n".encode()
        reply = json.loads(self._request("POST", "/files", None, body, f"multipart/form-data; boundary={boundary}"))
        return str(reply["id"])

    def create(self, file_id: str) -> str:
        reply = json.loads(self._request("POST", "/batches", {"input_file_id": file_id,
                                                              "endpoint": "/v1/chat/completions",
                                                              "completion_window": "24h"}))
        return str(reply["id"])

    def status(self, batch_id: str) -> dict[str, Any]:
        return json.loads(self._request("GET", f"/batches/{batch_id}"))

    def wait(self, batch_id: str, poll_seconds: float, max_wait: Optional[float],
             on_poll: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Poll until the batch is final; the last status. Raises TimeoutError past ``max_wait``."""
        start = time.monotonic()
        while True:
            state = self.status(batch_id)
            on_poll(state)
            if state.get("status") in FINAL_STATES:
                return state
            if max_wait is not None and time.monotonic() - start >= max_wait:
                raise TimeoutError(state.get("status", "unknown"))
            time.sleep(poll_seconds)

    def results(self, state: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """custom_id -> the reply body of every request that succeeded (from the output file)."""
        file_id = state.get("output_file_id")
        if not file_id:
            return {}
        out = {}
        for line in self._request("GET", f"/files/{file_id}/content").decode("utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            response = record.get("response") or {}
            if response.get("status_code") == 200 and isinstance(response.get("body"), dict):
                out[str(record.get("custom_id"))] = response["body"]
        return out

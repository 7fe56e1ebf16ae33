"""A loopback HTTP server for ``gem data`` tests, and data set tables that point at it.

:class:`DataServer` serves files at ``/<data set>/<file>`` on 127.0.0.1 with HTTP range support,
and per file a failure mode: ``flaky`` (drops the connection half-way through the body, N times),
``quota`` (an HTML page with status 200, Google Drive's usual failure), ``truncate`` (claims the
full length but sends only part of the body, every time), ``ignore_range`` (answers a range with
the whole file and status 200) and ``drive`` (``/uc?export=download&id=ID`` answers with Drive's
confirm page, whose form leads to the file). It records every request.

:func:`fixture_sources` writes miniature copies of the published files (from data_fixtures) and
returns a table like :data:`gem.data_download.SOURCES` whose sizes and checksums are theirs.
"""

from __future__ import annotations

import hashlib
import re
import threading
import zipfile
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, urlsplit

from gem import data_download as dd

QUOTA_PAGE = (b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>"
              b"Too many users have viewed or downloaded this file recently.</body></html>")


@dataclass
class Request:
    path: str
    range: Optional[str]
    status: int
    sent: int


@dataclass
class DataServer:
    """Serves ``files`` (URL path -> bytes); ``modes`` (URL path -> (mode, count)) make it fail."""

    files: dict[str, bytes] = field(default_factory=dict)
    modes: dict[str, tuple[str, int]] = field(default_factory=dict)
    drive: dict[str, str] = field(default_factory=dict)   # Drive id -> URL path of the file
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                server._get(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def body_requests(self, path: str) -> list[Request]:
        """Requests of ``path`` that were answered with (part of) the file."""
        return [r for r in self.requests if r.path == path and r.status in (200, 206)]

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        path, query = url.path, parse_qs(url.query)
        shown = path  # what the request log records: the path asked for
        if path == "/uc" and "id" in query:  # Drive: the confirm page of a large file
            if query["id"][0] not in self.drive:
                self._send(h, path, 404, b"no such file", "text/plain")
                return
            page = (f'<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>'
                    f'<form id="download-form" action="/download" method="get">'
                    f'<input type="hidden" name="id" value="{query["id"][0]}">'
                    f'<input type="hidden" name="confirm" value="t">'
                    f'<input type="hidden" name="uuid" value="u-1"></form></body></html>').encode()
            self._send(h, path, 200, page, "text/html; charset=utf-8")
            return
        if path == "/download":
            if query.get("confirm") != ["t"] or query.get("uuid") != ["u-1"]:
                self._send(h, path, 200, QUOTA_PAGE, "text/html")
                return
            path = self.drive[query["id"][0]]
        if path not in self.files:
            self._send(h, path, 404, b"not found", "text/plain")
            return
        data = self.files[path]
        mode, left = self.modes.get(path, ("", 0))
        if mode == "quota":
            self._send(h, path, 200, QUOTA_PAGE, "text/html; charset=utf-8")
            return
        start = 0
        wanted = h.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if match and mode != "ignore_range":
            start = int(match.group(1))
            if start >= len(data):
                self._send(h, path, 416, b"", "text/plain", extra={"Content-Range": f"bytes */{len(data)}"},
                           range_=wanted)
                return
        body = data[start:]
        status = 206 if start else 200
        extra = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
        cut = None
        if mode == "flaky" and left > 0:
            self.modes[path] = (mode, left - 1)
            cut = len(body) // 2
        elif mode == "truncate":
            cut = max(0, len(data) * 3 // 4 - start)
        self._send(h, shown, status, body, "application/octet-stream", extra=extra, cut=cut, range_=wanted)

    def _send(self, h: BaseHTTPRequestHandler, path: str, status: int, body: bytes, ctype: str,
              extra: Optional[dict] = None, cut: Optional[int] = None, range_: Optional[str] = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.end_headers()
        payload = body if cut is None else body[:cut]
        # Logged before the body goes out: the client may be done before this thread runs again.
        request = Request(path, range_, status, len(payload))
        self.requests.append(request)
        try:
            h.wfile.write(payload)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            request.sent = 0
        if cut is not None:
            h.close_connection = True


def _digests(data: bytes) -> dict[str, str]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}


def _zip_folder(folder: Path, archive: Path, inside: str) -> bytes:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{inside}/{path.relative_to(folder).as_posix()}")
    return archive.read_bytes()


def fixture_sources(work: Path, server: DataServer, which: tuple[str, ...] = tuple(dd.SOURCES)) -> dict[str, dd.DataSource]:
    """Miniature published files of the data sets ``which``, served by ``server`` at
    ``/<name>/<file>``; returns the table of them, same names, roots and layouts as the real one,
    with the miniatures' sizes and checksums."""
    from data_fixtures import write_celeba, write_dsprites, write_lsun_lmdb, write_shapes3d

    work = Path(work)
    made: dict[str, dict[str, bytes]] = {}
    if "dsprites" in which:
        path = work / "dsprites" / dd.SOURCES["dsprites"].files[0].name
        write_dsprites(path, n=64)
        made["dsprites"] = {path.name: path.read_bytes()}
    if "shapes3d" in which:
        path = work / "shapes3d" / "3dshapes.h5"
        write_shapes3d(path, n=32)
        made["shapes3d"] = {path.name: path.read_bytes()}
    if "celeba" in which:
        folder = work / "celeba"
        write_celeba(folder, n=20)
        made["celeba"] = {"img_align_celeba.zip": _zip_folder(folder / "img_align_celeba", work / "celeba.zip",
                                                              "img_align_celeba")}
        for remote in dd.SOURCES["celeba"].files[1:]:
            made["celeba"][remote.name] = (folder / remote.name).read_bytes()
    for name, category, inside in (("lsun_horse", "horse", "horse"), ("lsun_bedroom", "bedroom", "bedroom_train_lmdb")):
        if name in which:
            folder = work / name / inside
            write_lsun_lmdb(folder, [(200, 30, 30), (30, 200, 30), (30, 30, 200)])
            made[name] = {dd.SOURCES[name].files[0].name: _zip_folder(folder, work / f"{name}.zip", inside)}
    table = {}
    for name, files in made.items():
        real = dd.SOURCES[name]
        remotes = []
        for remote in real.files:
            data = files[remote.name]
            server.files[f"/{name}/{remote.name}"] = data
            sums = _digests(data) if remote.checksummed else {"sha256": None, "md5": None}
            remotes.append(replace(remote, url=f"{server.url}/{name}/{remote.name}", drive_id=None,
                                   size=len(data) if remote.size is not None else None,
                                   sha256=sums["sha256"] if remote.sha256 else None,
                                   md5=sums["md5"] if remote.md5 else None,
                                   n_files=None if remote.n_files is None else 20))
        table[name] = replace(real, files=tuple(remotes))
    return table

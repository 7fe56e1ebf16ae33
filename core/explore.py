"""``gem explore RUN_DIR``: a local web page to move attributes and watch the relation graph work.

The page (``explore_page.html``, one static file with its script inline) talks to a small
standard-library HTTP server in this process, which holds the trained run and decodes on the
run's device. :class:`Explorer` is the model side (encode an origin, decode a code two ways);
:func:`make_server` wraps it in JSON endpoints:

``GET /api/run``
    attributes, slider range, relation matrices (learned A, oracle S with its interval, the true
    impact where the data set knows it), held-out image count, decoders.
``GET /api/thumb?index=K``
    held-out image K as a PNG.
``POST /api/origin`` ``{"kind": "held_out", "index": K}`` or ``{"kind": "prior", "seed": S}``
    the origin's code by attribute name, its image and its reconstruction.
``POST /api/decode`` ``{"origin": ..., "code": {name: value}, "mode": ..., "decoder": ...}``
    the image(s) and each attribute's decoder input.

Two decodings of a code z (attribute order) moved away from its origin z₀:

* relation-aware: the decoder reads z_rel = Aᵀz, so moving attribute i moves every attribute j
  with A[i, j] ≠ 0;
* independent: the decoder reads Aᵀz₀ + (z − z₀), so moving attribute i moves its own input only.

Both decode the origin to the same reconstruction. A run whose graph is the identity (the flat
baselines) decodes the same either way, and the page says so.

Bad requests answer 400 with ``{"error": message}``; the server keeps running.
"""

from __future__ import annotations

import argparse
import base64
import errno
import io
import json
import math
import threading
import time
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch
from PIL import Image

from gem.cli_errors import guard
from gem.errors import GemError
from gem.io import to_jsonable
from gem.progress import add_verbosity_options, logger, setup_from_args
from gem.run_folder import TrainedRun, load_run
from gem.training import to_float

__all__ = ["Explorer", "RequestError", "make_server", "explore_main"]

MODES = ("relation", "independent", "both")
DEFAULT_DECODER = "decoder"
#: Held-out images the page shows as thumbnails (the rest are reached with next/random).
THUMBNAILS = 24
#: An edge is drawn when |A[i, j]| is at least this share of the largest off-diagonal |A|.
EDGE_FLOOR = 0.02


class RequestError(GemError, ValueError):
    """A request the page or a client sent that cannot be answered; the message says why."""


def png_data_url(image: np.ndarray) -> str:
    """uint8 or [0, 1] float (H, W, 3) -> ``data:image/png;base64,...``."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def png_bytes(image: np.ndarray) -> bytes:
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class Explorer:
    """Encode an origin and decode moved codes of one trained run (thread-safe).

    Codes travel by attribute name; ``z`` in attribute order is what :class:`RelationModel`'s
    ``to_attributes`` gives (each latent reoriented so that higher means more of the attribute).
    """

    def __init__(self, run: TrainedRun):
        self.run = run
        self.attributes = run.attributes
        self.held_out = np.asarray(run.split.held_out)
        self.device = run.device
        self.decoders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {DEFAULT_DECODER: run.extractor.decode}
        self.decoders.update(run.extractor.extra_decoders())
        self.adjacency = run.learned_adjacency
        off_diagonal = self.adjacency - np.diag(np.diag(self.adjacency))
        self.related = run.relation.is_bound and not np.allclose(off_diagonal, 0.0, atol=1e-6)
        self._lock = threading.Lock()
        self._origins: OrderedDict[tuple, dict[str, Any]] = OrderedDict()

    # -- what the page needs once ---------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        recipe, impact = self.run.recipe, self.run.impact
        note = None
        if not self.run.relation.is_bound:
            note = "the latents were never bound to attributes: both modes decode the same code"
        elif not self.related:
            note = ("the relation graph has no edges (A = I, a flat baseline): relation-aware and independent "
                    "decoding agree")
        return {
            "run_dir": str(self.run.run_dir),
            "name": recipe.name,
            "extractor": recipe.plugin_name("extractor"),
            "graph": recipe.plugin_name("graph"),
            "dataset": recipe.plugin_name("dataset"),
            "attributes": self.attributes,
            "range": float(recipe.evaluation.traversal_range),
            "held_out": int(len(self.held_out)),
            "thumbnails": int(min(THUMBNAILS, len(self.held_out))),
            "image_size": int(self.run.dataset.images.shape[1]),
            "device": str(self.device),
            "related": self.related,
            "note": note,
            "edge_floor": EDGE_FLOOR,
            "matrices": to_jsonable({"A": self.adjacency, "S": impact.get("oracle_impact"),
                                     "S_low": impact.get("ci_low"), "S_high": impact.get("ci_high"),
                                     "true": impact.get("true_impact")}),  # NaN cells become null
            "decoders": [{"name": name, "note": None if name == DEFAULT_DECODER else
                          "a sampler, not the trained decoder: expect seconds per image on a CPU"}
                         for name in self.decoders],
            "modes": list(MODES),
        }

    def thumbnail(self, index: int) -> bytes:
        return png_bytes(self._held_out_image(index))

    # -- per request ---------------------------------------------------------------------------

    def origin(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """The origin's code by name, its image (None for a prior sample) and reconstruction."""
        state = self._origin_state(spec)
        recon = self._decode_inputs(state["zr0"][None], DEFAULT_DECODER)[0]
        return {"code": self._named(state["z0"]), "inputs": self._named(state["zr0"]),
                "original": None if state["image"] is None else png_data_url(state["image"]),
                "reconstruction": png_data_url(recon)}

    def decode(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Decode ``request["code"]`` (by name; names left out keep the origin's value)."""
        if not isinstance(request, Mapping):
            raise RequestError("the request body must be a JSON object")
        mode = request.get("mode", "relation")
        if mode not in MODES:
            raise RequestError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        decoder = request.get("decoder", DEFAULT_DECODER)
        if decoder not in self.decoders:
            raise RequestError(f"unknown decoder {decoder!r}; this run has {', '.join(self.decoders)}")
        state = self._origin_state(request.get("origin") or {"kind": "held_out", "index": 0})
        z = state["z0"].clone()
        code = request.get("code") or {}
        if not isinstance(code, Mapping):
            raise RequestError("'code' must map attribute names to numbers")
        for name, value in code.items():
            if name not in self.attributes:
                raise RequestError(f"unknown attribute {name!r}; this run's attributes are {', '.join(self.attributes)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RequestError(f"the value of {name!r} must be a finite number, got {value!r}")
            z[self.attributes.index(name)] = float(value)
        wanted = ["relation", "independent"] if mode == "both" else [mode]
        inputs = {m: (self._relation_inputs(z) if m == "relation" else state["zr0"] + (z - state["z0"]))
                  for m in wanted}
        started = time.perf_counter()
        images = self._decode_inputs(torch.stack([inputs[m] for m in wanted]), decoder)
        took = time.perf_counter() - started
        return {"mode": mode, "decoder": decoder, "decode_ms": round(took * 1000.0, 1),
                "images": {m: png_data_url(image) for m, image in zip(wanted, images)},
                "inputs": {m: self._named(inputs[m]) for m in wanted}}

    # -- model side ----------------------------------------------------------------------------

    def _held_out_image(self, index: Any) -> np.ndarray:
        if isinstance(index, bool) or not isinstance(index, int):
            raise RequestError(f"an image index must be a whole number, got {index!r}")
        if not 0 <= index < len(self.held_out):
            raise RequestError(f"held-out image {index} does not exist; this run holds out {len(self.held_out)} "
                               f"images (0..{len(self.held_out) - 1})")
        return np.asarray(self.run.dataset.images[int(self.held_out[index])])

    def _origin_state(self, spec: Any) -> dict[str, Any]:
        if not isinstance(spec, Mapping):
            raise RequestError("'origin' must be {\"kind\": \"held_out\", \"index\": K} or {\"kind\": \"prior\", \"seed\": S}")
        kind = spec.get("kind")
        if kind == "held_out":
            key: tuple = ("held_out", spec.get("index"))
        elif kind == "prior":
            seed = spec.get("seed", 0)
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise RequestError(f"a prior sample's seed must be a whole number, got {seed!r}")
            key = ("prior", seed)
        else:
            raise RequestError(f"unknown origin kind {kind!r}; choose held_out or prior")
        with self._lock:
            if key in self._origins:
                self._origins.move_to_end(key)
                return self._origins[key]
        relation = self.run.relation
        if kind == "held_out":
            image = self._held_out_image(key[1])
            with self._lock, torch.no_grad():
                x = to_float(torch.from_numpy(image[None].copy())).to(self.device)
                mu, _ = self.run.extractor.encode(x)
                z0 = relation.to_attributes(mu)[0]
        else:
            image = None
            generator = torch.Generator().manual_seed(key[1])
            z0 = torch.randn(len(self.attributes), generator=generator).to(self.device)
        state = {"image": image, "z0": z0, "zr0": self._relation_inputs(z0)}
        with self._lock:
            self._origins[key] = state
            while len(self._origins) > 64:
                self._origins.popitem(last=False)
        return state

    def _relation_inputs(self, z_attr: torch.Tensor) -> torch.Tensor:
        """Decoder input Aᵀz in attribute order."""
        relation = self.run.relation
        with self._lock, torch.no_grad():
            return relation.to_attributes(relation(relation.from_attributes(z_attr[None])))[0]

    def _decode_inputs(self, inputs_attr: torch.Tensor, decoder: str) -> np.ndarray:
        """Decoder inputs (B, n) in attribute order -> float images (B, H, W, 3) in [0, 1]."""
        with self._lock, torch.no_grad():
            latent = self.run.relation.from_attributes(inputs_attr.to(self.device))
            images = self.decoders[decoder](latent)
            return images.permute(0, 2, 3, 1).float().clamp(0, 1).cpu().numpy()

    def _named(self, values: torch.Tensor) -> dict[str, float]:
        return {name: round(float(v), 5) for name, v in zip(self.attributes, values.tolist())}


def page_html() -> bytes:
    return (resources.files("gem") / "explore_page.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    explorer: Explorer
    page: bytes
    server_version = "gem-explore"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("explore: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, self.page, "text/html; charset=utf-8")
        if url.path == "/favicon.ico":
            return self._send(HTTPStatus.NO_CONTENT, b"", "text/plain")
        if url.path == "/api/run":
            return self._answer(self.explorer.info)
        if url.path == "/api/thumb":
            query = parse_qs(url.query)
            try:
                index = int(query.get("index", [""])[0])
            except ValueError:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": "thumb needs ?index=K, a whole number"})
            return self._answer(lambda: self.explorer.thumbnail(index), content_type="image/png")
        return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}"})

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        action = {"/api/origin": self.explorer.origin, "/api/decode": self.explorer.decode}.get(url.path)
        if action is None:
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {url.path}"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(min(length, 1 << 20)) or b"{}")
        except (ValueError, UnicodeDecodeError):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "the request body is not JSON"})
        return self._answer(lambda: action(body))

    def _answer(self, compute: Callable[[], Any], content_type: str = "application/json") -> None:
        try:
            result = compute()
        except RequestError as exc:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except Exception as exc:  # a model failure: reported to the page, the server keeps running
            logger.exception("explore: request %s failed", self.path)
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR,
                              {"error": f"the server failed on this request: {type(exc).__name__}: {exc}"})
        if content_type == "application/json":
            return self._json(HTTPStatus.OK, result)
        return self._send(HTTPStatus.OK, result, content_type)

    def _json(self, status: HTTPStatus, value: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the page went away mid-answer
            pass


def make_server(explorer: Explorer, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) for ``explorer``; a busy port is a :class:`GemError`."""
    handler = type("ExploreHandler", (_Handler,), {"explorer": explorer, "page": page_html()})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise GemError(f"port {port} on {host} is in use (another gem explore?); choose another with "
                           "--port N, or --port 0 for any free one") from None
        raise GemError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    server.daemon_threads = True
    return server


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Open a local web page to move a trained run's "
                                     "attributes and watch the relation graph propagate them.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder written by gem-run")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (8765; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (127.0.0.1: this machine only; 0.0.0.0 exposes the page)")
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    add_verbosity_options(parser)
    return parser


def explore_main(argv: Optional[Sequence[str]] = None, prog: str = "gem explore") -> int:
    """``gem explore RUN_DIR [--port N] [--host ADDRESS] [--open]``: serve the page until Ctrl-C."""
    args = _parser(prog).parse_args(argv)
    setup_from_args(args)

    def action() -> int:
        logger.info("loading %s", args.run_dir)
        explorer = Explorer(load_run(args.run_dir))
        server = make_server(explorer, args.host, args.port)
        host, port = server.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        url = f"http://{shown}:{port}/"
        if host in ("127.0.0.1", "localhost", "::1"):
            print(f"gem explore: listening on loopback only (this machine): {url}", flush=True)
        else:
            print(f"gem explore: WARNING: listening on {host}: anyone who can reach this machine on port {port} "
                  "can use the page and see the run's images", flush=True)
            print(f"gem explore: {url}", flush=True)
        print("gem explore: Ctrl-C stops the server", flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(url)
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            print("gem explore: stopped", flush=True)
        finally:
            server.server_close()
        return 0

    return guard(action, args.debug, prog)

"""`gem explore` latency: from a slider move to a decoded PNG, over HTTP, at 64×64.

A run of the default recipe's model (gem_vae, 64×64, few training steps: weights do not change
the cost) is loaded as `gem explore` loads it, served on loopback, and sent the request the page
sends when a slider moves, each with a new value. The reference is the decoder's forward pass
alone, so the ratio is what the server, the relation path and PNG encoding add.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from common import Figure, Row, ratio

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["dataset.n_images=1000", "scoring.n_images=300", "training.steps=4", "training.warmup_steps=2",
            "training.cpu=true", "evaluation.n_images=50", "evaluation.full_metrics=false"]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _timings(fn, n: int) -> list[float]:
    out = []
    for k in range(n):
        start = time.perf_counter()
        fn(k)
        out.append((time.perf_counter() - start) * 1000.0)
    return out


def bench_explore(quick: bool) -> Row:
    from gem.cli import run_main
    from gem.explore import Explorer, make_server
    from gem.run_folder import load_run

    n = 30 if quick else 300
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        args = [str(ROOT / "recipes" / "synthetic.yaml"), "--out", str(run_dir), "-q",
                "--set", f"cache_dir={tmp}/cache"]
        for setting in SETTINGS:
            args += ["--set", setting]
        with contextlib.redirect_stdout(io.StringIO()):  # the run's summary table is not the benchmark's
            status = run_main(args)
        if status != 0:
            raise RuntimeError("the benchmark's run failed")
        explorer = Explorer(load_run(run_dir))
        server = make_server(explorer, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/api/decode"
        name = explorer.attributes[0]
        size = int(explorer.run.dataset.images.shape[1])
        try:
            _post(url, {"code": {name: 0.0}})  # first request: the origin is encoded and cached
            slide = lambda k: 2.5 * ((k % 50) / 25.0 - 1.0)  # noqa: E731 - a slider sweeping -2.5..2.5
            one = _timings(lambda k: _post(url, {"code": {name: slide(k)}, "mode": "relation"}), n)
            both = _timings(lambda k: _post(url, {"code": {name: slide(k)}, "mode": "both"}), n)
            z = torch.zeros(1, explorer.run.extractor.latent_dim)
            with torch.no_grad():
                forward = _timings(lambda k: explorer.run.extractor.decode(z), n)
        finally:
            server.shutdown()
            server.server_close()
    median, p95 = statistics.median(one), sorted(one)[int(0.95 * (len(one) - 1))]
    decoder = statistics.median(forward)
    return Row(
        name="explore", title=f"gem explore: slider move to decoded PNG over HTTP, {size}×{size}, median of {n}",
        ours=Figure("POST /api/decode (relation-aware), round trip", median, "ms"),
        reference=Figure("decoder forward pass alone", decoder, "ms"),
        ratio=ratio(median, decoder), ratio_meaning="round trip / decoder forward (what server, relation and PNG add)",
        target="median < 100 ms on 2 CPU cores", met=median < 100.0,
        figures={"median ms": median, "p95 ms": p95, "side by side median ms": statistics.median(both),
                 "decoder forward ms": decoder, "image size": float(size)},
        notes=[f"relation-aware: median {median:.1f} ms, p95 {p95:.1f} ms; side by side (two images): "
               f"median {statistics.median(both):.1f} ms; decoder alone {decoder:.1f} ms",
               "the browser adds its own image decode and layout: the page shows both figures after each move"])

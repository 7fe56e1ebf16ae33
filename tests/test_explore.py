"""``gem explore``: the model side (two decodings against A in closed form), the JSON server and the CLI.

The page itself is driven in a real browser by tests/test_explore_browser.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gem.cli import main
from gem.errors import GemError
from gem.explore import DEFAULT_DECODER, Explorer, RequestError, make_server
from gem.run_folder import load_run


def pixels(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))).astype(int)


@pytest.fixture(scope="module")
def explorer(trained_gem_run):
    return Explorer(load_run(trained_gem_run))


@pytest.fixture(scope="module")
def server(explorer):
    server = make_server(explorer, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def call(base: str, path: str, body=None) -> tuple[int, dict | bytes]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(base + path, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, payload, kind = response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        status, payload, kind = exc.code, exc.read(), exc.headers["Content-Type"]
    return status, (json.loads(payload) if kind == "application/json" else payload)


def test_info_describes_the_run(explorer, trained_gem_run):
    info = explorer.info()
    run = explorer.run
    assert info["attributes"] == run.attributes and info["range"] == run.recipe.evaluation.traversal_range
    assert info["held_out"] == len(run.split.held_out) and info["related"] and info["note"] is None
    assert np.allclose(np.array(info["matrices"]["A"], dtype=float), run.learned_adjacency)
    assert np.allclose(np.array(info["matrices"]["S"], dtype=float), run.impact["oracle_impact"])
    assert info["matrices"]["true"] is not None  # the synthetic data set knows its true impact
    assert [d["name"] for d in info["decoders"]] == [DEFAULT_DECODER]
    json.dumps(info)  # the page receives it as JSON


def test_the_origin_is_the_encoded_held_out_image(explorer):
    import torch

    run = explorer.run
    origin = explorer.origin({"kind": "held_out", "index": 2})
    image = np.asarray(run.dataset.images[run.split.held_out[2]])
    assert np.array_equal(pixels(origin["original"]), image)
    with torch.no_grad():
        mu, _ = run.extractor.encode(torch.from_numpy(image[None].copy()).permute(0, 3, 1, 2).float() / 255)
        expected = run.relation.to_attributes(mu)[0].numpy()
    assert np.allclose([origin["code"][a] for a in run.attributes], expected, atol=1e-4)
    # Unmoved, both decodings give the reconstruction.
    both = explorer.decode({"origin": {"kind": "held_out", "index": 2}, "mode": "both"})
    assert np.array_equal(pixels(both["images"]["relation"]), pixels(origin["reconstruction"]))
    assert np.array_equal(pixels(both["images"]["independent"]), pixels(origin["reconstruction"]))


def test_moving_one_attribute_propagates_through_A_only_when_relation_aware(explorer):
    names, A = explorer.attributes, explorer.adjacency
    origin = {"kind": "held_out", "index": 1}
    start = explorer.origin(origin)
    z0 = np.array([start["code"][a] for a in names])
    inputs0 = np.array([start["inputs"][a] for a in names])
    assert np.allclose(inputs0, z0 @ A, atol=1e-4)  # z_rel = Aᵀz
    i, delta = 0, 1.5
    moved = explorer.decode({"origin": origin, "code": {names[i]: z0[i] + delta}, "mode": "both"})
    relation = np.array([moved["inputs"]["relation"][a] for a in names])
    independent = np.array([moved["inputs"]["independent"][a] for a in names])
    assert np.allclose(relation - inputs0, delta * A[i], atol=1e-3)
    expected_independent = inputs0.copy()
    expected_independent[i] += delta
    assert np.allclose(independent, expected_independent, atol=1e-3)
    assert np.count_nonzero(np.abs(delta * A[i]) > 0.01) >= 2  # the tiny run's graph does have edges out of i
    recon = pixels(start["reconstruction"])
    assert np.abs(pixels(moved["images"]["relation"]) - recon).sum() > 0


def test_a_prior_sample_is_reproducible_by_seed(explorer):
    a = explorer.origin({"kind": "prior", "seed": 7})
    b = explorer.origin({"kind": "prior", "seed": 7})
    c = explorer.origin({"kind": "prior", "seed": 8})
    assert a["original"] is None and a["code"] == b["code"] != c["code"]


@pytest.mark.parametrize("request_body, message", [
    ({"code": {"no_such": 1.0}}, "unknown attribute 'no_such'; this run's attributes are floor_hue"),
    ({"code": {"scale": "big"}}, "must be a finite number"),
    ({"mode": "sideways"}, "unknown mode 'sideways'; choose one of relation, independent, both"),
    ({"decoder": "ddpm"}, "unknown decoder 'ddpm'; this run has decoder"),
    ({"origin": {"kind": "held_out", "index": 10_000}}, "held-out image 10000 does not exist; this run holds out"),
    ({"origin": {"kind": "dream"}}, "unknown origin kind 'dream'"),
    ({"origin": {"kind": "prior", "seed": 1.5}}, "seed must be a whole number"),
])
def test_bad_requests_say_what_is_wrong(explorer, request_body, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(")):
        explorer.decode(request_body)


def test_the_server_answers_json_and_survives_bad_requests(server, explorer, monkeypatch):
    status, page = call(server, "/")
    assert status == 200 and b"gem explore" in page and b"/api/decode" in page
    status, info = call(server, "/api/run")
    assert status == 200 and info["attributes"] == explorer.attributes
    status, png = call(server, "/api/thumb?index=0")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    for path, body, code, says in [
        ("/api/decode", {"code": {"nope": 1}}, 400, "unknown attribute 'nope'"),
        ("/api/decode", b"{not json", 400, "not JSON"),
        ("/api/thumb?index=x", None, 400, "whole number"),
        ("/api/thumb?index=99999", None, 400, "does not exist"),
        ("/api/nothing", None, 404, "no such page"),
        ("/api/nothing", {}, 404, "no such endpoint"),
    ]:
        status, answer = call(server, path, body)
        assert status == code and says in answer["error"], (path, answer)
    # A model failure is a 500 with the reason, and the next request is served.
    monkeypatch.setitem(explorer.decoders, "broken", lambda z: (_ for _ in ()).throw(RuntimeError("out of memory")))
    status, answer = call(server, "/api/decode", {"decoder": "broken"})
    assert status == 500 and "RuntimeError: out of memory" in answer["error"]
    status, answer = call(server, "/api/decode", {"code": {explorer.attributes[0]: 1.0}})
    assert status == 200 and answer["images"]["relation"].startswith("data:image/png;base64,")


def test_a_busy_port_is_a_clear_error(explorer):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(GemError, match=f"port {port} on 127.0.0.1 is in use.*--port 0"):
            make_server(explorer, "127.0.0.1", port)


def test_a_baseline_run_decodes_the_same_both_ways_and_says_so(trained_baseline_run):
    explorer = Explorer(load_run(trained_baseline_run))
    info = explorer.info()
    assert info["extractor"] == "beta_vae" and not info["related"] and "A = I" in info["note"]
    names = explorer.attributes
    both = explorer.decode({"code": {names[0]: 2.0}, "mode": "both"})
    assert both["inputs"]["relation"] == both["inputs"]["independent"]
    assert np.array_equal(pixels(both["images"]["relation"]), pixels(both["images"]["independent"]))


def test_not_a_run_folder_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("name: x\n")
    assert main(["explore", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a finished gem run: model.pt, scores.csv, impact.json are missing" in err
    assert "Traceback" not in err


def _start_cli(run_dir: Path, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    gem = Path(sys.executable).parent / "gem"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([str(gem), "explore", str(run_dir), "--port", "0", "-q", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if "Ctrl-C" in line:
            return process, lines
    process.kill()
    raise AssertionError("gem explore did not start:\n" + "\n".join(lines))


def test_gem_explore_serves_until_ctrl_c(trained_gem_run):
    process, lines = _start_cli(trained_gem_run)
    try:
        assert "listening on loopback only" in lines[0]
        url = lines[0].rsplit(" ", 1)[1]
        status, info = call(url.rstrip("/"), "/api/run")
        assert status == 200 and info["attributes"]
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
        assert process.returncode == 0 and "stopped" in out
    finally:
        process.kill()


def test_listening_on_every_interface_prints_a_warning(trained_gem_run):
    process, lines = _start_cli(trained_gem_run, "--host", "0.0.0.0")
    process.kill()
    process.communicate()
    assert "WARNING: listening on 0.0.0.0" in lines[0] and "anyone who can reach this machine" in lines[0]


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory):
    from conftest import _train_tiny

    extractor = {"plugin": "ivae_ddpm", "image_size": 32, "channels": 8, "hidden": 32, "lr": 2e-3,
                 "unet_channels": 8, "unet_mults": [1, 2], "unet_blocks": 1, "sample_steps": 3}
    return _train_tiny(tmp_path_factory, "diffusion-run", extractor=extractor)


def test_a_run_with_a_diffusion_sampler_offers_it(diffusion_run):
    explorer = Explorer(load_run(diffusion_run))
    decoders = {d["name"]: d["note"] for d in explorer.info()["decoders"]}
    assert decoders["decoder"] is None and "seconds per image" in decoders["diffusion"]
    names = explorer.attributes
    request = {"code": {names[0]: 2.0}, "mode": "both"}
    sampled = explorer.decode({**request, "decoder": "diffusion"})
    plain = explorer.decode(request)
    assert sampled["decoder"] == "diffusion" and sampled["inputs"] == plain["inputs"]
    assert not np.array_equal(pixels(sampled["images"]["relation"]), pixels(plain["images"]["relation"]))
    # The sampler is deterministic (DDIM, fixed noise): the same code gives the same image.
    again = explorer.decode({**request, "decoder": "diffusion"})
    assert np.array_equal(pixels(again["images"]["relation"]), pixels(sampled["images"]["relation"]))

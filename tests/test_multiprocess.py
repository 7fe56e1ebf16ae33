"""Data-parallel training and sharded oracle scoring on two CPU processes (accelerate's launcher, gloo).

`gem-run --num-processes 2` starts `accelerate launch --multi_gpu --num_processes 2 ...` with
`training.cpu` forced on where there is no GPU (see ../shared/ENVIRONMENT.md: `--cpu` starts one).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from fake_openai import FakeOpenAI

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
KEY = "sk-multiprocess-SECRET-42"


def _gem_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gem.cli", "run", *args], env=ENV, capture_output=True,
                          text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.fixture
def recipe_file(tiny_recipe, tmp_path):
    tiny_recipe["training"].update(steps=40, warmup_steps=10, batch_size=8, log_every=10)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    return path


def test_two_processes_write_one_run_that_agrees_with_one_process(recipe_file, tmp_path):
    _ok(_gem_run(str(recipe_file), "--out", str(tmp_path / "one")))
    two = _gem_run(str(recipe_file), "--out", str(tmp_path / "two"), "--num-processes", "2")
    _ok(two)
    assert "launching 2 processes" in two.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["cache", "one", "two"]  # no stray folders
    one_m = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two_m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one_m["training"]["processes"] == 1 and two_m["training"]["processes"] == 2
    one_i = json.loads((tmp_path / "one" / "impact.json").read_text())
    two_i = json.loads((tmp_path / "two" / "impact.json").read_text())
    # Same scores, so the same S; A is trained from S on each side (tolerance: 0.05 per edge).
    assert np.array_equal(np.array(one_i["oracle_impact"]), np.array(two_i["oracle_impact"]))
    assert np.abs(np.array(one_i["learned_adjacency"]) - np.array(two_i["learned_adjacency"])).max() < 0.05
    # The same optimisation up to the sampling noise of each process (tolerance: 15 % on the MSE).
    mse1, mse2 = one_m["reconstruction"]["mse"], two_m["reconstruction"]["mse"]
    assert abs(mse1 - mse2) / mse1 < 0.15, (mse1, mse2)
    history = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [h["step"] for h in history] == [10, 20, 30, 40]
    assert (tmp_path / "two" / "report.html").is_file() and (tmp_path / "two" / "model.pt").is_file()


SYNC_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np, torch
    from accelerate.utils import gather_object, set_seed
    from gem.interfaces import BuildContext
    from gem.plugins import Registry, make_plugin_manager
    from gem.recipe import TrainingOptions
    from gem.relations import RelationModel
    from gem.context import leave_process_group, make_accelerator
    from gem.training import Trainer

    opts = TrainingOptions(steps=6, batch_size=8, warmup_steps=0, log_every=3, cpu=True,
                           gradient_accumulation_steps={accumulate})
    acc = make_accelerator(opts)
    set_seed(0)
    registry = Registry(make_plugin_manager())
    context = BuildContext(seed=0, run_dir=".", cache_dir=".", attributes=list("abcd"))
    reg = registry.get("extractor", "gem_vae")
    model = reg.build(reg.options(image_size=32, channels=8, hidden=32, lr=1e-3, disc_lr=1e-3), context)
    greg = registry.get("graph", "gcn")
    graph = greg.build(greg.options(), context)
    graph.set_anchor(torch.full((4, 4), 0.3))
    relation = RelationModel(graph, 4)
    relation.bind(np.arange(4), np.ones(4))
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    set_seed(1, device_specific=True)  # different noise on each process
    images = np.random.default_rng(0).integers(0, 255, (64, 32, 32, 3), dtype=np.uint8)
    trainer = Trainer(model, relation, images, np.arange(64), opts, 0, acc)
    seen = []
    trainer.extractor.encoder.register_forward_hook(lambda m, a, o: seen.append(float(a[0].sum())))
    trainer.fit(6)
    params = list(trainer.extractor.parameters()) + list(trainer.relation.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])
    report = {{"rank": acc.process_index, "sum": float(flat.double().sum()), "abs": float(flat.double().abs().sum()),
              "moved": float((flat[:len(start)] - start).abs().max()), "first_batch": seen[0]}}
    everything = gather_object([report])
    if acc.is_main_process:
        print("REPORT " + json.dumps(everything))
    leave_process_group(acc)
""")


@pytest.mark.parametrize("accumulate", [1, 2])
def test_replicas_stay_identical_while_seeing_different_images(tmp_path, accumulate):
    script = tmp_path / "sync.py"
    script.write_text(SYNC_SCRIPT.format(accumulate=accumulate))
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(_free_port()), str(script)],
                          env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    _ok(proc)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))
    reports = sorted(json.loads(line[len("REPORT "):]), key=lambda r: r["rank"])
    assert len(reports) == 2
    a, b = reports
    assert a["moved"] > 0 and b["moved"] > 0  # training changed the weights
    assert a["first_batch"] != b["first_batch"]  # each process got its own half of the batch
    assert a["sum"] == b["sum"] and a["abs"] == b["abs"]  # gradients averaged: replicas identical


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sharded_scoring_makes_the_same_requests_as_one_process(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(ENV, "GEM_TEST_KEY", KEY)
    attrs = ["floor_hue", "wall_hue", "object_hue", "scale", "position", "shape"]
    server = FakeOpenAI(attrs, lambda attribute, image: int(image[5, 5, attrs.index(attribute) % 3]) * 6 // 256)
    with server:
        tiny_recipe["oracle"] = {"plugin": "openai", "model": "fake-vision", "base_url": server.base_url,
                                 "api_key_env": "GEM_TEST_KEY", "backoff_base": 0.01, "backoff_max": 0.05,
                                 "hedge_factor": None}  # exact request counts
        tiny_recipe["scoring"].update(n_images=40, batch_size=8)
        tiny_recipe["training"].update(steps=4, warmup_steps=2)
        runs = {}
        for n in (1, 2):
            tiny_recipe["cache_dir"] = str(tmp_path / f"cache{n}")  # each starts with an empty score cache
            path = tmp_path / f"openai{n}.yaml"
            path.write_text(yaml.safe_dump(tiny_recipe))
            before = len(server.requests)
            _ok(_gem_run(str(path), "--out", str(tmp_path / f"run{n}"), "--num-processes", str(n)))
            runs[n] = server.requests[before:]
    assert len(runs[1]) == len(runs[2]) == 40  # per_image mode: one request per image, none twice
    assert (tmp_path / "run1" / "scores.csv").read_text() == (tmp_path / "run2" / "scores.csv").read_text()
    metrics = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    # Summed over both processes; on a starved machine a reply can time out and be asked again.
    oracle = metrics["oracle"]
    assert oracle["requests"] == 40 + oracle["retries"] and oracle["images_asked"] == 40
    for file in (tmp_path / "run2").rglob("*"):
        if file.is_file():
            assert KEY.encode() not in file.read_bytes(), file


def test_batch_must_split_evenly_between_processes(tmp_path):
    from types import SimpleNamespace

    from gem.recipe import TrainingOptions
    from gem.training import Trainer

    images = np.zeros((16, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="batch_size is 8, which 3 processes cannot share evenly"):
        Trainer(None, None, images, np.arange(16), TrainingOptions(batch_size=8), 0, SimpleNamespace(num_processes=3))


def test_num_processes_must_be_positive(tiny_recipe, tmp_path):
    from gem.cli import run_main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert run_main([str(path), "--out", str(tmp_path / "x"), "--num-processes", "0"]) == 2

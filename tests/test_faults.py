"""Fault injection: killed and interrupted runs resume, flaky oracles, NaN losses, bad input, secrets.

Every fault below is one the README's "Reliability" section lists with what happens.
"""

import copy
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, TINY_RECIPE
from fake_openai import FakeOpenAI, closed_port_url, decode_data_url, request_parts
from gem.cli import run_main
from gem.score_cache import ScoreCache, image_hash
from gem.training import CHECKPOINT_FILE, Trainer

KEY = "sk-fault-SECRET-9f8e7d6c5b4a3210"
ATTRS = ["floor_hue", "wall_hue", "object_hue", "scale", "position", "shape"]
EXPECTED_FILES = ["recipe.yaml", "scores.csv", "impact.csv", "impact.json", "metrics.json", "history.json",
                  "model.pt", "report.md", "report.html", "checkpoint/state.pt", "figures/loss_curves.png"]
CLI = "import sys; from gem.cli import run_main; sys.exit(run_main(sys.argv[1:]))"


def write_recipe(tmp_path: Path, name: str = "tiny.yaml", **sections) -> Path:
    data = copy.deepcopy(TINY_RECIPE)
    data["cache_dir"] = str(tmp_path / "cache")
    data["out"] = str(tmp_path / "runs")
    for key, value in sections.items():
        if key in ("training", "scoring", "evaluation") and isinstance(value, dict):  # merged; others replaced
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def checkpoint_step(run_dir: Path) -> int:
    return int(torch.load(run_dir / "checkpoint" / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["step"])


def assert_same_weights(a: Path, b: Path) -> None:
    first = torch.load(a / "model.pt", map_location="cpu", weights_only=True)
    second = torch.load(b / "model.pt", map_location="cpu", weights_only=True)
    for part in ("extractor", "relation"):
        assert first[part].keys() == second[part].keys()
        for key in first[part]:
            assert torch.equal(first[part][key], second[part][key]), f"{part}.{key} differs"


def spawn(args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.update(kwargs.pop("env", {}))
    return subprocess.Popen([sys.executable, "-c", CLI, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=kwargs.pop("cwd", None), **kwargs)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the fault: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# Resume: the same result as an uninterrupted run


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    path = write_recipe(tmp, training={"checkpoint_every": 3})
    assert run_main([str(path), "--out", str(tmp / "run")]) == 0
    return path, tmp / "run"


@pytest.mark.parametrize("stop_at", [2, 4, 7])  # in the warm-up, at the binding, after it
def test_interrupted_and_resumed_run_is_bit_identical(straight_run, tmp_path, monkeypatch, capsys, stop_at):
    path, straight = straight_run
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:  # Ctrl-C arrives during step `stop_at`
        patch.setattr(Trainer, "stop_requested", lambda self: self.step == stop_at)
        assert run_main([str(path), "--out", str(run_dir)]) == 130
    err = capsys.readouterr().err
    assert f"stopped at step {stop_at}; checkpoint saved in {run_dir / 'checkpoint'}" in err
    assert f"continue with: gem-run --resume {run_dir}" in err and "Traceback" not in err
    assert checkpoint_step(run_dir) == stop_at and not (run_dir / "model.pt").exists()
    bound = torch.load(run_dir / "checkpoint" / CHECKPOINT_FILE, weights_only=True)["relation"]["bound"]
    assert bool(bound) == (stop_at > 4)  # the binding happens after step 4 (warmup_steps)

    assert run_main(["--resume", str(run_dir)]) == 0
    assert f"resuming from the checkpoint at step {stop_at} of 12" in capsys.readouterr().err
    assert_same_weights(straight, run_dir)  # tolerance: none, every weight is bit-identical
    assert json.loads((run_dir / "history.json").read_text()) == json.loads((straight / "history.json").read_text())
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, run_dir))
    assert a["reconstruction"] == b["reconstruction"] and a["binding"] == b["binding"]
    assert a["relations"] == b["relations"]
    assert (run_dir / "scores.csv").read_text() == (straight / "scores.csv").read_text()
    assert checkpoint_step(run_dir) == 12


def test_resume_checks_the_recipe(straight_run, tmp_path, capsys):
    path, straight = straight_run
    assert run_main(["--resume", str(tmp_path / "nowhere")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert run_main([str(path), "--resume", str(straight), "--set", "extractor.beta=2"]) == 2
    err = capsys.readouterr().err
    assert "differs from the run's recipe.yaml in extractor.beta (4.0 -> 2.0)" in err and "training.steps" in err
    assert run_main(["--resume", str(straight), "--set", "training.steps=10"]) == 2
    assert "at step 12, past training.steps=10" in capsys.readouterr().err


def test_a_damaged_checkpoint_is_named_not_trusted(straight_run, tmp_path, capsys):
    import shutil

    _, straight = straight_run
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    state = run_dir / "checkpoint" / CHECKPOINT_FILE
    state.write_bytes(state.read_bytes()[:1000])
    assert run_main(["--resume", str(run_dir)]) == 2
    assert f"cannot read the checkpoint {state}" in capsys.readouterr().err


def test_sigkill_mid_training_then_resume(tmp_path):
    path = write_recipe(tmp_path, training={"steps": 120, "checkpoint_every": 10, "log_every": 10})
    run_dir = tmp_path / "run"
    proc = spawn([path, "--out", run_dir])
    state = run_dir / "checkpoint" / CHECKPOINT_FILE
    wait_for(state.exists, proc)  # the first checkpoint (at the binding, step 4) ...
    first = state.stat().st_ino
    wait_for(lambda: state.stat().st_ino != first, proc)  # ... then one more, replaced atomically
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = checkpoint_step(run_dir)
    assert 10 <= killed_at < 120 and not (run_dir / "model.pt").exists()
    resumed = spawn(["--resume", run_dir])
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming from the checkpoint at step {killed_at} of 120" in err
    for name in EXPECTED_FILES:
        assert (run_dir / name).is_file(), name
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["step"] for r in history] == [4, *range(14, 120, 10), 120]  # none lost, none twice
    assert checkpoint_step(run_dir) == 120
    assert json.loads((run_dir / "metrics.json").read_text())["training"]["steps"] == 120
    assert not list((run_dir / "checkpoint").glob(".*.tmp"))


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    path = write_recipe(tmp_path, training={"steps": 400, "checkpoint_every": 5})
    run_dir = tmp_path / "run"
    proc = spawn([path, "--out", run_dir])
    wait_for((run_dir / "checkpoint" / CHECKPOINT_FILE).exists, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    match = re.search(r"stopped at step (\d+); checkpoint saved in (\S+); continue with: gem-run --resume (\S+)", err)
    assert match and Path(match.group(3)) == run_dir and "Traceback" not in err, err
    assert checkpoint_step(run_dir) == int(match.group(1)) < 400


def test_ctrl_c_while_binding_latents_also_saves_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """Between the warm-up and training no step runs; a Ctrl-C there still stops cleanly."""
    import gem.pipeline

    bind = gem.pipeline.bind_latents

    def bind_then_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return bind(*args, **kwargs)

    monkeypatch.setattr(gem.pipeline, "bind_latents", bind_then_ctrl_c)
    path = write_recipe(tmp_path, training={"steps": 12, "warmup_steps": 4})
    run_dir = tmp_path / "run"
    assert run_main([str(path), "--out", str(run_dir)]) == 130
    err = capsys.readouterr().err
    assert f"stopped at step 4; checkpoint saved in {run_dir / 'checkpoint'}; continue with: gem-run --resume {run_dir}" \
        in err
    assert checkpoint_step(run_dir) == 4
    monkeypatch.setattr(gem.pipeline, "bind_latents", bind)
    assert run_main(["--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "history.json").read_text())[-1]["step"] == 12


# ---------------------------------------------------------------------------------------------
# A NaN loss


def test_nan_loss_names_the_term_and_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys, registry):
    cls = registry.get("extractor", "gem_vae").factory
    original, calls = cls.training_step, []

    def step(self, *args, **kwargs):
        logs = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 7:  # step 6 (0-based)
            logs["kl"] = float("nan")
        return logs

    monkeypatch.setattr(cls, "training_step", step)
    path = write_recipe(tmp_path, training={"checkpoint_every": 4})
    run_dir = tmp_path / "run"
    assert run_main([str(path), "--out", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert ("loss term 'kl' became nan at step 6; the last good checkpoint (step 4) is kept in "
            f"{run_dir / 'checkpoint'}") in err and "Traceback" not in err
    assert checkpoint_step(run_dir) == 4 and not (run_dir / "model.pt").exists()


# ---------------------------------------------------------------------------------------------
# Oracle faults


@pytest.fixture
def fake_server():
    scorer = lambda attribute, image: int(image[5, 5, ATTRS.index(attribute) % 3]) * 6 // 256  # noqa: E731
    with FakeOpenAI(ATTRS, scorer) as server:
        yield server


def openai_section(server, **extra):
    return {"plugin": "openai", "model": "fake-vision", "base_url": server.base_url, "api_key_env": "GEM_FAULT_KEY",
            "backoff_base": 0.001, "backoff_max": 0.01, "hedge_factor": None, **extra}  # exact request counts


def requested_hashes(requests) -> set:
    return {image_hash(decode_data_url(request_parts(r["body"])[1][0])) for r in requests}


def test_sigkill_mid_scoring_then_resume_repeats_no_finished_request(tmp_path, fake_server, monkeypatch):
    monkeypatch.setenv("GEM_FAULT_KEY", KEY)
    fake_server.default, fake_server.slow_seconds = "slow", 0.03  # pace the answers
    path = write_recipe(tmp_path, oracle=openai_section(fake_server, max_concurrency=2),
                        scoring={"n_images": 40, "batch_size": 4}, training={"steps": 4, "warmup_steps": 2})
    run_dir = tmp_path / "run"
    proc = spawn([path, "--out", run_dir])
    wait_for(lambda: len(fake_server.requests) >= 14, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    first = list(fake_server.requests)
    with ScoreCache(tmp_path / "cache" / "oracle_scores.sqlite") as cache:
        committed = {row[0] for row in cache._db.execute("SELECT DISTINCT image FROM scores")}
        assert 8 <= len(committed) < 40 and cache.count() == len(committed) * 6  # whole images only
    fake_server.default = "ok"
    assert run_main(["--resume", str(run_dir)]) == 0
    second = fake_server.requests[len(first):]
    assert not requested_hashes(second) & committed  # nothing already stored is asked again
    assert len(first) + len(second) - 40 <= 2  # at most the requests in flight at the kill are asked twice
    lines = (run_dir / "scores.csv").read_text().splitlines()[1:]
    assert len(lines) == 40 and all(cell for line in lines for cell in line.split(","))  # no lost score
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["oracle"]["cache_hits"] == len(committed) * 6 and metrics["oracle"]["missing_scores"] == 0


def test_random_429_500_timeouts_and_garbage_every_score_accounted_for(tmp_path, fake_server, monkeypatch):
    from gem.interfaces import ImageDataset
    from gem.scoring import score_images
    from gem_plugins.openai_oracle import OpenAIOracle, OpenAIOracleOptions

    monkeypatch.setenv("GEM_FAULT_KEY", KEY)
    rng = np.random.default_rng(8)
    # A slow reply takes 3 s against the client's 1 s timeout: a wide margin, so that a prompt reply
    # on a loaded machine is never taken for a timeout.
    fake_server.slow_seconds = 3.0
    fake_server.script(list(rng.choice(["ok", "429", "500", "slow", "garbage"], size=400,
                                       p=[0.45, 0.15, 0.15, 0.1, 0.15])))
    images = rng.integers(0, 256, size=(30, 16, 16, 3), dtype=np.uint8)
    oracle = OpenAIOracle(OpenAIOracleOptions(model="fake", base_url=fake_server.base_url, api_key_env="GEM_FAULT_KEY",
                                              timeout=1.0, max_retries=2, backoff_base=0.001, backoff_max=0.01,
                                              max_concurrency=4, hedge_factor=None))
    with ScoreCache(tmp_path / "s.sqlite") as cache:
        scores, _ = score_images(oracle, ImageDataset(images, ATTRS), np.arange(30), 10, cache, show_progress=False)
        stats = oracle.stats()
        oracle.close()
        valid = int((~np.isnan(scores)).sum())
        assert valid + stats["failures"] == 30 * 6 and stats["budget_exhausted"] == 0  # scored or counted failed
        assert cache.count() == valid  # every valid score is stored, no missing one
    served = fake_server.behaviours
    assert stats["requests"] == len(fake_server.requests) == len(served)
    assert stats["retries"] == stats["requests"] - 30
    assert stats["rate_limited"] == served.count("429") and stats["server_errors"] == served.count("500")
    assert stats["transport_errors"] == served.count("slow") and stats["invalid_replies"] == served.count("garbage")
    assert 0 < stats["failures"] < 30 * 6 // 2 and all(v in range(6) for v in scores[~np.isnan(scores)])


def test_too_many_missing_scores_stop_before_training_and_keep_what_arrived(tmp_path, fake_server, monkeypatch, capsys):
    monkeypatch.setenv("GEM_FAULT_KEY", KEY)
    fake_server.default = "partial"  # every reply holds only the first attribute
    path = write_recipe(tmp_path, oracle=openai_section(fake_server, max_retries=0), scoring={"n_images": 20},
                        training={"steps": 4, "warmup_steps": 2})
    run_dir = tmp_path / "run"
    assert run_main([str(path), "--out", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"100 of 120 scores are missing \(83\.3%\): " + ", ".join(f"{a} 20" for a in ATTRS[1:]), err)
    assert "more than scoring.max_missing=0.1; the scores that arrived are kept in" in err
    assert not run_dir.exists()
    with ScoreCache(tmp_path / "cache" / "oracle_scores.sqlite") as cache:
        assert cache.count() == 20
    fake_server.default = "ok"
    before = len(fake_server.requests)
    assert run_main([str(path), "--out", str(run_dir)]) == 0
    asked = fake_server.requests[before:]
    assert len(asked) == 20 and all(f'"{ATTRS[0]}"' not in request_parts(r["body"])[0] for r in asked)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, exit status 2, no traceback (--debug shows it)


def _image_folder(root: Path, n: int = 60) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    lines = ["file,Red,Blue"]
    for i in range(n):
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:03d}.png")
        lines.append(f"{i:03d}.png,{int(pixels[..., 0].mean()) * 6 // 256},{int(pixels[..., 2].mean()) * 6 // 256}")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    lines += ["broken.png,1,1", "missing.png,2,2"]
    (root / "attributes.csv").write_text("\n".join(lines) + "\n")


BAD_INPUTS = {
    "malformed YAML": ("name: x\ntraining:\n  steps: [1, 2\n", [], r"malformed YAML at line 4, column 1"),
    "unknown key": ({"trainnig": {}}, [], r"unknown recipe key 'trainnig'.*training"),
    "unknown nested key": ({"extractor": {"plugin": "gem_vae", "betta": 2}}, [], r"'extractor.betta'.*beta"),
    "wrong type": ({}, ["training.steps=many"], r"'training.steps': expected an integer, got str 'many'"),
    "negative beta": ({}, ["extractor.beta=-1"], r"'extractor': beta must be >= 0, got -1.0"),
    "zero steps": ({}, ["training.steps=0"], r"'training': steps must be > 0, got 0"),
    "latent size": ({}, ["extractor.latent_dim=3"],
                    r"extractor.latent_dim is 3 but the recipe models 6 attributes \(floor_hue"),
    "unknown plugin": ({}, ["graph.plugin=gat"], r"'graph.plugin'.*'gat'.*fixed.*gcn.*identity"),
    "module path as plugin": ({}, ["dataset.plugin=os:system"], r"'dataset.plugin'.*'os:system'.*synthetic"),
    "missing data": ({}, ["dataset={plugin: image_folder, root: {tmp}/nothing, attributes: [a]}"],
                     r"image_folder.*does not exist"),
    "empty data set": ({}, ["dataset={plugin: image_folder, root: {tmp}/empty, attributes: [a]}"],
                       r"no images found"),
    "missing API key": ({}, ["oracle={plugin: openai, api_key_env: GEM_FAULT_UNSET_KEY}"],
                        r"needs an API key in the environment variable GEM_FAULT_UNSET_KEY, which is unset"),
    "unreachable oracle": ({}, ["oracle={plugin: openai, api_key_env: null, base_url: '{closed}', max_retries: 1, "
                                "backoff_base: 0.001}"],
                           r"cannot reach http://127\.0\.0\.1:\d+/v1: Connection refused \(GET "
                           r"http://127\.0\.0\.1:\d+/v1/models before scoring; is the server running"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_without_traceback(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GEM_FAULT_UNSET_KEY", raising=False)
    content, overrides, message = BAD_INPUTS[case]
    (tmp_path / "empty").mkdir()
    if isinstance(content, str):
        path = tmp_path / "bad.yaml"
        path.write_text(content)
    else:
        path = write_recipe(tmp_path, **content)
    overrides = [o.replace("{tmp}", str(tmp_path)).replace("{closed}", closed_port_url()) for o in overrides]
    run_dir = tmp_path / "run"
    args = [str(path), "--out", str(run_dir), *[a for o in overrides for a in ("--set", o)]]
    assert run_main(args) == 2
    out = capsys.readouterr()
    error = out.err[out.err.index("gem-run: error: "):]  # one line; a missing data set also lists where to put it
    assert re.match(r"gem-run: error: [^\n]*" + message, error), error
    assert error.rstrip().endswith("gem-run: run again with --debug for the traceback")
    assert "Traceback" not in out.err + out.out
    # Nothing was trained, and nothing was asked of an oracle that could not work; the run folder
    # this run made is gone again.
    assert not run_dir.exists()


def test_debug_shows_the_traceback(tmp_path):
    path = write_recipe(tmp_path)
    with pytest.raises(Exception, match="latent_dim is 3"):
        run_main([str(path), "--out", str(tmp_path / "run"), "--set", "extractor.latent_dim=3", "--debug"])


def test_an_unexpected_error_is_not_a_user_error(tmp_path, monkeypatch, capsys):
    """Only gem's own error types (gem.errors.GemError) are one line; anything else is a bug and
    goes up with its traceback, even a plain ValueError."""
    import gem.pipeline

    path = write_recipe(tmp_path)
    for error in (RuntimeError("internal bug"), ValueError("internal bug")):
        def fail(*args, **kwargs):
            raise error

        monkeypatch.setattr(gem.pipeline, "run_recipe", fail)
        with pytest.raises(type(error), match="internal bug"):
            run_main([str(path), "--out", str(tmp_path / "run")])
        assert "error:" not in capsys.readouterr().err
        assert not (tmp_path / "run").exists()  # nothing written before the failure: folder removed


def test_an_unexpected_error_prints_its_traceback():
    code = ("import sys, gem.cli\n"
            "def fail(pm):\n    raise ValueError('internal bug')\n"
            "gem.cli.describe_plugins = fail\n"
            "sys.exit(gem.cli.main(['plugins']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ValueError: internal bug" in proc.stderr
    assert "gem: error:" not in proc.stderr


def test_a_closed_pipe_ends_the_output_quietly():
    """`gem plugins --json | head -1`: the reader goes away before gem has written; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "gem.cli", "plugins", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.stdout.close()  # before the interpreter has even imported gem
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


def test_a_broken_pipe_that_is_not_stdout_is_a_real_error():
    from gem.cli_errors import guard

    def action():
        raise BrokenPipeError("a worker went away")

    with pytest.raises(BrokenPipeError, match="worker"):
        guard(action, False, "gem")


@pytest.mark.parametrize("argv, message", [
    (["eval", "{tmp}", "--n-train", "0"], "n_train must be >= 1"),
    (["eval", "{tmp}", "--metrics", "nope"], "unknown metric 'nope'"),
    (["oracle-eval", "--n-images", "0"], "--n-images must be at least 1"),
    (["run", "--num-processes", "0"], "--num-processes must be >= 1"),
    (["run", "--overwrite"], "--overwrite replaces the run in the folder --out names"),
    (["run", "no_such_recipe"], "unknown recipe 'no_such_recipe'.*shipped recipes: celeba"),
])
def test_bad_command_line_arguments_are_one_line(argv, message, tmp_path, capsys):
    from gem.cli import main

    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert re.search(r"^gem [\w-]+: error: [^\n]*" + message, err, re.M), err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Run folders: a failed start leaves nothing behind; two runs never share a folder


def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path, capsys):
    empty = tmp_path / "celeba"
    empty.mkdir()
    path = write_recipe(tmp_path, dataset={"plugin": "celeba", "root": str(empty), "image_size": 32})
    runs = tmp_path / "runs"  # the recipe's out: runs/<name>-<time>/ by default
    assert run_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "celeba: CelebA files are missing" in err and "removed its folder" in err
    assert not runs.exists()  # nor the runs/ folder it made for it
    assert run_main([str(path), "--out", str(tmp_path / "a" / "b" / "run")]) == 2
    assert not (tmp_path / "a").exists()
    # An --out folder that was already there stays, empty as it was.
    (tmp_path / "mine").mkdir()
    assert run_main([str(path), "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []
    # A run that failed once it had its scores keeps its folder: --resume reuses them.
    from gem.pipeline import discard_unstarted_run

    kept = tmp_path / "kept"
    (kept / "figures").mkdir(parents=True)
    for name in ("recipe.yaml", "scores.csv"):
        (kept / name).write_text("x")
    assert not discard_unstarted_run(kept, created=True)
    assert sorted(p.name for p in kept.iterdir()) == ["figures", "recipe.yaml", "scores.csv"]
    (kept / "scores.csv").unlink()
    assert discard_unstarted_run(kept, created=True) and not kept.exists()


def test_out_into_a_folder_that_holds_a_run_is_refused(straight_run, tmp_path, capsys):
    import shutil

    path, straight = straight_run
    before = sorted(str(p.relative_to(straight)) for p in straight.rglob("*"))
    assert run_main([str(path), "--out", str(straight)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"gem-run: error: --out '{re.escape(str(straight))}' already holds a run \(recipe.yaml, "
                     rf"model.pt, metrics.json, scores.csv, checkpoint\); .*--overwrite.*--resume", err), err
    assert sorted(str(p.relative_to(straight)) for p in straight.rglob("*")) == before  # untouched

    # --overwrite removes the old run's files (and only those) before the new run starts.
    old = tmp_path / "old"
    shutil.copytree(straight, old)
    (old / "notes.txt").write_text("mine")
    empty = tmp_path / "celeba"
    empty.mkdir()
    args = [str(path), "--out", str(old), "--set", f"dataset={{plugin: celeba, root: '{empty}', image_size: 32}}"]
    assert run_main([*args, "--overwrite"]) == 2  # the new run then fails on its missing data
    err = capsys.readouterr().err
    assert f"removed the earlier run's files from {old}; kept what gem did not write: notes.txt" in err
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt"]


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    _image_folder(tmp_path / "imgs")
    path = write_recipe(tmp_path, dataset={"plugin": "image_folder", "root": str(tmp_path / "imgs"),
                                           "attributes_csv": "attributes.csv", "image_size": 32},
                        scoring={"n_images": 40}, evaluation={"n_images": 10},
                        training={"steps": 4, "warmup_steps": 2})
    assert run_main([str(path), "--out", str(tmp_path / "run")]) == 0
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]
    assert data["images"] == 60 and data["skipped_images"] == 2
    assert [s.split(":")[0] for s in data["skipped_files"]] == ["broken.png", "missing.png"]
    assert "broken.png" in (tmp_path / "run" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# Secrets and safe loading


def test_the_api_key_is_nowhere_in_the_run_folder_cache_or_output(tmp_path, fake_server, monkeypatch, capsys,
                                                                  caplog):
    monkeypatch.setenv("GEM_FAULT_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    fake_server.script(["500", "429", "garbage", "slow"] * 3)
    fake_server.slow_seconds = 0.3
    path = write_recipe(tmp_path, oracle=openai_section(fake_server, timeout=0.2),
                        scoring={"n_images": 20}, training={"steps": 4, "warmup_steps": 2, "checkpoint_every": 2})
    run_dir = tmp_path / "run"
    assert run_main([str(path), "--out", str(run_dir)]) == 0
    assert all(r["headers"].get("Authorization") == f"Bearer {KEY}" for r in fake_server.requests)
    files = [f for folder in (run_dir, tmp_path / "cache") for f in folder.rglob("*") if f.is_file()]
    assert len(files) > 15 and (run_dir / "checkpoint" / CHECKPOINT_FILE) in files
    for file in files:
        assert KEY.encode() not in file.read_bytes(), file
    out = capsys.readouterr()
    assert KEY not in out.out + out.err + caplog.text
    assert "sk-fault" not in (run_dir / "recipe.yaml").read_text()


SOURCES = [p for folder in ("core", "gem_plugins", "hooks") for p in sorted((ROOT / folder).rglob("*.py"))]


def test_sources_load_only_safely():
    """torch.load always with weights_only (True unless a caller opts out), YAML only with safe_load,
    no pickle, no eval, and plugins only through the registry (no import of a recipe's string)."""
    for path in SOURCES:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^\n]*", text):
            assert "weights_only=True" in call or "weights_only=weights_only" in call, (path, call)
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(|yaml\.(Unsafe|Full)?Loader\b", text), path
        assert not re.search(r"\bpickle\.loads?\(|(?<![\w.])eval\(|(?<![\w.])exec\(", text), path
    fidelity = (ROOT / "core" / "fidelity.py").read_text()
    assert re.search(r"def load_feature_extractor\([^)]*weights_only: bool = True", fidelity)


def test_remote_code_is_off_by_default_in_local_models():
    from gem_plugins.llava_oracle import LlavaOracleOptions

    assert LlavaOracleOptions().trust_remote_code is False


def test_checkpoint_holds_only_plain_values(straight_run):
    _, straight = straight_run
    state = torch.load(straight / "checkpoint" / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert state["step"] == 12 and state["extra"]["scores"].shape == (300, 6)
    assert {"extractor", "relation", "optimizers", "rng", "history"} <= set(state)

"""``gem oracle-eval``: an oracle's scores against the data set's labels (GEM paper Sec. 4.4)."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml
from fake_openai import FakeOpenAI
from conftest import TINY_RECIPE

from gem.oracle_eval import evaluate_oracle, format_oracle_table, oracle_main
from gem.recipe import validate_recipe
from gem_plugins.synthetic import FACTOR_LEVELS, attribute_scores, render

N = 300
ATTRS = ["floor_hue", "wall_hue", "object_hue", "scale", "position", "shape"]


@pytest.fixture(autouse=True)
def one_thread():
    # Two shared cores; the recipes below also say training.threads=1, which sets it for the process.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def recipe_data(tmp_path, n_images=N, **oracle):
    return {"name": "oracle-test", "cache_dir": str(tmp_path / "cache"), "out": str(tmp_path / "runs"),
            "dataset": {"plugin": "synthetic", "n_images": n_images, "image_size": 32, "factors": ATTRS,
                        "correlations": TINY_RECIPE["dataset"]["correlations"]},
            "oracle": {"plugin": "labels", **oracle},
            "training": {"cpu": True, "threads": 1},
            "scoring": {"n_images": n_images, "batch_size": 100}}


def true_labels(tmp_path, registry, n_images=N):
    """The synthetic data set's labels, built the way the evaluation builds it."""
    from pathlib import Path

    from gem.interfaces import BuildContext

    recipe = validate_recipe(recipe_data(tmp_path, n_images), registry)
    context = BuildContext(seed=recipe.seed, run_dir=tmp_path, cache_dir=Path(recipe.cache_dir))
    return registry.get("dataset", "synthetic").build(recipe.plugin_options["dataset"], context).attribute_scores


def test_perfect_oracle_is_right_on_every_attribute_and_writes_everything(tmp_path, registry):
    recipe = validate_recipe(recipe_data(tmp_path, error_rate=0.0), registry)
    out = tmp_path / "eval"
    result = evaluate_oracle(recipe, registry, out, show_progress=False)
    assert result["n_images"] == N and result["attributes"] == ATTRS
    assert result["accuracy"] == {a: 1.0 for a in ATTRS} and result["accuracy_mean"] == 1.0
    assert result["missing_rate"] == {a: 0.0 for a in ATTRS} and result["all_missing_rate"] == 0.0
    labels = true_labels(tmp_path, registry)
    assert result["all_zero_rate"] == pytest.approx(float((labels == 0).all(axis=1).mean()))
    assert result["counters"] == {"cache_hits": 0, "images_asked": N}
    assert result["binary"] == {a: False for a in ATTRS}
    for name in ("oracle_eval.json", "oracle_accuracy.png", "oracle_scores.csv", "recipe.yaml",
                 "report.html", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "oracle_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "oracle_eval.json").read_text())
    assert saved["accuracy"] == result["accuracy"] and saved["counters"] == result["counters"]
    assert saved["cache_key"] == "labels/error=0.0/missing=0.0/seed=0"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "floor_hue" in html  # the figure is in the page
    assert "oracle_accuracy.png" in (out / "report.md").read_text()
    with open(out / "oracle_scores.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["image", *ATTRS, *(f"{a} (label)" for a in ATTRS)] and len(rows) == N + 1
    assert all(row[1:7] == row[7:] for row in rows[1:])  # perfect oracle: score == label
    table = format_oracle_table(result)
    assert all(a in table for a in ATTRS)
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:] if line.split()}
    assert all(rows[a][:3] == ["1", "0", "0-5"] for a in ATTRS) and rows["mean"] == ["1", "0"]


def test_half_random_oracle_cli_matches_the_closed_form(tmp_path, capsys):
    # The labels oracle replaces a score, with probability e, by a uniform draw from 0..5, which
    # hits the label with probability 1/6: accuracy = (1 - e) + e/6 = 7/12 for e = 0.5. Each
    # attribute's accuracy over N = 300 images is binomial with sd sqrt(p(1-p)/N) = 0.028 and the
    # mean over 6 attributes has sd 0.012; the tolerances are 4 sd (0.12 and 0.05).
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data(tmp_path)))
    out = tmp_path / "eval"
    code = oracle_main([str(path), "--set", "oracle.error_rate=0.5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "accuracy" in printed and "missing" in printed and all(a in printed for a in ATTRS)
    assert str(out / "report.html") in printed
    result = json.loads((out / "oracle_eval.json").read_text())
    expected = 0.5 + 0.5 / 6
    for a in ATTRS:
        assert result["accuracy"][a] == pytest.approx(expected, abs=0.12), a
    assert result["accuracy_mean"] == pytest.approx(expected, abs=0.05)
    assert f"{result['accuracy_mean']:.3f}" in printed
    # Fewer images from the command line; the first 50 are already in the cache.
    assert oracle_main([str(path), "--set", "oracle.error_rate=0.5", "--out", str(tmp_path / "e50"),
                        "--n-images", "50"]) == 0
    small = json.loads((tmp_path / "e50" / "oracle_eval.json").read_text())
    assert small["n_images"] == 50 and small["counters"] == {"cache_hits": 50 * 6, "images_asked": 0}


def test_missing_answers_are_left_out_of_the_accuracy(tmp_path, registry):
    recipe = validate_recipe(recipe_data(tmp_path, missing_rate=0.3), registry)
    out = tmp_path / "eval"
    result = evaluate_oracle(recipe, registry, out, show_progress=False)
    with open(out / "oracle_scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for a in ATTRS:
        empty = sum(row[a] == "" for row in rows) / N
        assert result["missing_rate"][a] == pytest.approx(empty)
        assert result["missing_rate"][a] == pytest.approx(0.3, abs=0.11)  # 4 sd of a binomial over 300
        assert result["accuracy"][a] == 1.0  # the answers given are all right: a missing one is not a 0
    assert result["missing_rate_overall"] == pytest.approx(np.mean(list(result["missing_rate"].values())))


def test_data_set_without_labels_is_a_clear_error(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "pictures"
    folder.mkdir()
    for k in range(4):
        Image.fromarray(np.full((20, 20, 3), 60 * k, dtype=np.uint8)).save(folder / f"{k}.png")
    data = recipe_data(tmp_path)
    data["dataset"] = {"plugin": "image_folder", "root": str(folder), "attributes": ["brightness"],
                       "image_size": 16, "workers": 1}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "eval"
    assert oracle_main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no attribute labels" in err and "'image_folder'" in err and "Traceback" not in err
    assert not (out / "oracle_eval.json").exists()


def test_openai_oracle_against_a_fake_server_then_all_from_the_cache(tmp_path, registry):
    """The fake server reads wall and floor hue off the image's pixels and answers 0 for the rest."""
    palettes = {name: [render(np.array([[k]]), [name], 32)[0][pixel] for k in range(FACTOR_LEVELS[name])]
                for name, pixel in (("wall_hue", (0, 0)), ("floor_hue", (-1, 0)))}

    def scorer(attribute, image):
        if attribute == "wall_hue":
            pixel = image[0, 0]
        elif attribute == "floor_hue":
            pixel = image[-1, 0]
        else:
            return 0
        palette = np.asarray(palettes[attribute], dtype=int)
        k = int(np.abs(palette - pixel.astype(int)).sum(axis=1).argmin())
        return int(attribute_scores(np.array([[k]]), [attribute])[0, 0])

    n = 40
    with FakeOpenAI(ATTRS, scorer) as server:
        data = recipe_data(tmp_path, n_images=n)
        data["oracle"] = {"plugin": "openai", "model": "fake-vision", "base_url": server.base_url,
                          "api_key_env": None, "max_concurrency": 4, "backoff_base": 0.01, "backoff_max": 0.05,
                          "hedge_factor": None}  # exact request counts
        recipe = validate_recipe(data, registry)
        first = evaluate_oracle(recipe, registry, tmp_path / "eval1", show_progress=False)
        assert len(server.requests) == n  # per_image: one request per image
        labels = true_labels(tmp_path, registry, n)
        assert first["accuracy"]["wall_hue"] == 1.0 and first["accuracy"]["floor_hue"] == 1.0
        for j, a in enumerate(ATTRS[2:], start=2):  # answered 0: right exactly where the label is 0
            assert first["accuracy"][a] == pytest.approx(float((labels[:, j] == 0).mean())), a
        assert first["all_zero_rate"] == pytest.approx(float((labels[:, :2] == 0).all(axis=1).mean()))
        assert first["missing_rate_overall"] == 0.0
        assert first["counters"]["requests"] == n and first["counters"]["images_asked"] == n
        assert first["cache_key"].startswith("openai/fake-vision/per_image/")

        second = evaluate_oracle(recipe, registry, tmp_path / "eval2", show_progress=False)
        assert len(server.requests) == n  # nothing new was asked
        assert second["counters"]["requests"] == 0
        assert second["counters"]["cache_hits"] == n * len(ATTRS) and second["counters"]["images_asked"] == 0
        assert second["accuracy"] == first["accuracy"]
        assert not math.isnan(second["accuracy_mean"])

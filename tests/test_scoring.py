"""Oracle scoring through the persistent cache, and full runs with the openai oracle."""

import json
import re

import numpy as np
import pytest
import yaml

from fake_openai import FakeOpenAI
from gem.cli import run_main
from gem.interfaces import ImageDataset, RelationOracle
from gem.scoring import score_images
from gem.score_cache import ScoreCache, image_hash

ATTRS = ["a", "b", "c"]


def _dataset(n=20):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    return ImageDataset(images=images, attributes=ATTRS)


class CountingOracle(RelationOracle):
    """Scores = (image index + attribute position) % 6; can fail after a number of batches."""

    cache_key = "counting/v1"

    def __init__(self, fail_after=None, missing=()):
        self.asked = []
        self.fail_after = fail_after
        self.missing = set(missing)

    def score(self, images, indices, attributes):
        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise KeyboardInterrupt  # a run killed mid-way
        self.asked.append((list(indices), list(attributes)))
        out = np.array([[(i + ATTRS.index(a)) % 6 for a in attributes] for i in indices], dtype=float)
        for row, i in enumerate(indices):
            if int(i) in self.missing:
                out[row, 0] = np.nan
        return out


def _expected(indices):
    return np.array([[(i + j) % 6 for j in range(3)] for i in indices], dtype=float)


def test_second_scoring_makes_no_requests(tmp_path):
    data, idx = _dataset(), np.arange(20)
    with ScoreCache(tmp_path / "s.sqlite") as cache:
        first = CountingOracle()
        scores, counts = score_images(first, data, idx, 8, cache, show_progress=False)
        np.testing.assert_array_equal(scores, _expected(idx))
        assert counts == {"cache_hits": 0, "images_asked": 20} and len(first.asked) == 3
        second = CountingOracle()
        again, counts = score_images(second, data, idx, 8, cache, show_progress=False)
        np.testing.assert_array_equal(again, scores)
        assert second.asked == [] and counts == {"cache_hits": 60, "images_asked": 0}


def test_killed_scoring_resumes_with_only_the_missing_images(tmp_path):
    data, idx = _dataset(), np.arange(20)
    with ScoreCache(tmp_path / "s.sqlite") as cache:
        with pytest.raises(KeyboardInterrupt):
            score_images(CountingOracle(fail_after=2), data, idx, 5, cache, show_progress=False)
        assert cache.count("counting/v1") == 10 * 3  # two committed batches of 5 images
        resumed = CountingOracle()
        scores, counts = score_images(resumed, data, idx, 5, cache, show_progress=False)
        asked = sorted(i for batch, _ in resumed.asked for i in batch)
        assert asked == list(range(10, 20))
        np.testing.assert_array_equal(scores, _expected(idx))


def test_missing_scores_are_not_cached_and_asked_again_alone(tmp_path):
    data, idx = _dataset(), np.arange(20)
    with ScoreCache(tmp_path / "s.sqlite") as cache:
        scores, _ = score_images(CountingOracle(missing={3, 7}), data, idx, 8, cache, show_progress=False)
        assert np.isnan(scores[[3, 7], 0]).all() and not np.isnan(scores[:, 1:]).any()
        retry = CountingOracle()
        scores, counts = score_images(retry, data, idx, 8, cache, show_progress=False)
        assert retry.asked == [([3, 7], ["a"])]  # only the missing pairs
        np.testing.assert_array_equal(scores, _expected(idx))
        assert counts["cache_hits"] == 58


def test_identical_images_share_cached_scores_and_keys_separate_oracles(tmp_path):
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    with ScoreCache(tmp_path / "s.sqlite") as cache:
        cache.put("x", [image_hash(images[0])], ATTRS, np.array([[1.0, 2.0, np.nan]]))
        got = cache.get("x", [image_hash(images[i]) for i in range(4)], ATTRS)
        np.testing.assert_array_equal(got[:, :2], [[1, 2]] * 4)
        assert np.isnan(got[:, 2]).all()
        assert np.isnan(cache.get("y", [image_hash(images[0])], ATTRS)).all()


def test_out_of_range_oracle_score_is_an_error():
    class Bad(CountingOracle):
        def score(self, images, indices, attributes):
            return np.full((len(indices), len(attributes)), 9.0)

    with pytest.raises(ValueError, match=r"oracle returned 9.0 for 'a'"):
        score_images(Bad(), _dataset(), np.arange(4), 4, None, show_progress=False)


KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture
def openai_recipe(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("GEM_TEST_KEY", KEY)
    attrs = ["floor_hue", "wall_hue", "object_hue", "scale", "position", "shape"]
    server = FakeOpenAI(attrs, lambda attribute, image: int(image[5, 5, attrs.index(attribute) % 3]) * 6 // 256)
    with server:
        tiny_recipe["oracle"] = {"plugin": "openai", "model": "fake-vision", "base_url": server.base_url,
                                 "api_key_env": "GEM_TEST_KEY", "backoff_base": 0.01, "backoff_max": 0.05,
                                 "hedge_factor": None}  # exact request counts
        tiny_recipe["scoring"]["n_images"] = 40
        tiny_recipe["training"].update(steps=4, warmup_steps=2)
        path = tmp_path / "openai.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe))
        yield path, server


def test_gem_run_with_openai_oracle_then_rerun_makes_no_requests(openai_recipe, tmp_path):
    path, server = openai_recipe
    assert run_main([str(path), "--out", str(tmp_path / "run1")]) == 0
    assert len(server.requests) == 40  # per_image mode: one request per image
    assert all(r["headers"].get("Authorization") == f"Bearer {KEY}" for r in server.requests)
    metrics = json.loads((tmp_path / "run1" / "metrics.json").read_text())
    assert metrics["oracle"]["requests"] == 40 and metrics["oracle"]["cache_hits"] == 0
    assert run_main([str(path), "--out", str(tmp_path / "run2"), "--set", "oracle.prompt_mode=per_image"]) == 0
    assert len(server.requests) == 40  # everything came from the cache
    metrics = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert metrics["oracle"]["cache_hits"] == 40 * 6 and metrics["oracle"].get("requests", 0) == 0
    # The key is never written anywhere: run folders and the cache.
    for folder in (tmp_path / "run1", tmp_path / "run2", tmp_path / "cache"):
        for file in folder.rglob("*"):
            if file.is_file():
                assert KEY.encode() not in file.read_bytes(), file


def test_per_attribute_mode_makes_n_requests_per_image(openai_recipe, tmp_path):
    path, server = openai_recipe
    assert run_main([str(path), "--out", str(tmp_path / "run"), "--set", "oracle.prompt_mode=per_attribute",
                     "--set", "scoring.cache=false"]) == 0
    assert len(server.requests) == 40 * 6


def test_dry_run_says_what_scoring_would_ask_and_cost_and_sends_nothing(openai_recipe, tmp_path, capsys):
    path, server = openai_recipe
    price = ["--set", "oracle.price_per_million_tokens={input: 2.5, output: 10}"]
    assert run_main([str(path), "--dry-run", *price]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("oracle 'openai'"))
    assert "40 images x 6 attributes, 0 of 240 scores cached, 40 images to ask: 40 requests to fake-vision" in line
    tokens = [int(t.replace(",", "")) for t in re.search(r"about ([\d,]+) input and ([\d,]+) output", line).groups()]
    cost = float(re.search(r"about \$([\d.]+) at \$2\.5 / \$10 per million", line).group(1))
    assert cost == pytest.approx((tokens[0] * 2.5 + tokens[1] * 10) / 1e6, abs=0.006)
    assert tokens[0] > 40 * 255  # each 32x32 image alone is 255 tokens under OpenAI's rule
    assert "nothing was sent or trained" in out
    assert len(server.requests) == 0 and server.model_lists == 0
    assert run_main([str(path), "--out", str(tmp_path / "run"), *price]) == 0
    assert "scores: " + line.split("to ask: ")[1] in capsys.readouterr().err  # the same before the paid run
    assert len(server.requests) == 40
    assert run_main([str(path), "--dry-run", *price]) == 0
    assert "240 of 240 scores cached, 0 images to ask" in capsys.readouterr().out


def test_oracle_eval_dry_run(openai_recipe, capsys):
    from gem.oracle_eval import oracle_main

    path, server = openai_recipe
    assert oracle_main([str(path), "--dry-run", "--n-images", "12", "--set", "oracle.prompt_mode=per_attribute"]) == 0
    out = capsys.readouterr().out
    assert "12 images x 6 attributes" in out and "72 requests to fake-vision" in out
    assert "oracle.price_per_million_tokens for the cost" in out and len(server.requests) == 0

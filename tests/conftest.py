import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registry():
    """A fresh plugin manager's registry (built-ins plus installed entry points)."""
    from gem.plugins import Registry, make_plugin_manager

    return Registry(make_plugin_manager())


TINY_RECIPE = {
    "name": "tiny",
    # Six factors (the default's without the window): the fakes and hand counts below assume six.
    "dataset": {"plugin": "synthetic", "n_images": 400, "image_size": 32,
                "factors": ["floor_hue", "wall_hue", "object_hue", "scale", "position", "shape"],
                "correlations": [["object_hue", "scale", 0.7], ["floor_hue", "wall_hue", 0.6],
                                 ["shape", "position", -0.5]]},
    "extractor": {"plugin": "gem_vae", "image_size": 32, "channels": 8, "hidden": 32, "lr": 1e-3, "disc_lr": 1e-3},
    "ranker": {"plugin": "somersd", "bootstrap": 20},
    "training": {"steps": 12, "warmup_steps": 4, "batch_size": 8, "log_every": 4, "cpu": True},
    "scoring": {"n_images": 300, "batch_size": 64},
    "evaluation": {"n_images": 40, "traversal_steps": 5, "full_metrics": False},
}


@pytest.fixture
def tiny_recipe(tmp_path):
    import copy

    data = copy.deepcopy(TINY_RECIPE)
    data["cache_dir"] = str(tmp_path / "cache")
    data["out"] = str(tmp_path / "runs")
    return data


def _train_tiny(tmp_path_factory, name: str, **sections) -> Path:
    import copy

    import yaml

    from gem.cli import run_main

    tmp = tmp_path_factory.mktemp(name)
    recipe = dict(copy.deepcopy(TINY_RECIPE), cache_dir=str(tmp / "cache"), out=str(tmp / "runs"))
    recipe["training"] = dict(recipe["training"], steps=8, warmup_steps=4)
    recipe.update(sections)
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp / "run"
    assert run_main([str(path), "--out", str(run_dir), "-q"]) == 0
    return run_dir


@pytest.fixture(scope="session")
def trained_gem_run(tmp_path_factory) -> Path:
    """A finished tiny GEM run folder (bound latents, a learned graph with edges), made once per session."""
    return _train_tiny(tmp_path_factory, "gem-run")


@pytest.fixture(scope="session")
def trained_baseline_run(tmp_path_factory) -> Path:
    """A finished tiny β-VAE run folder with the flat baselines' identity graph."""
    extractor = {"plugin": "beta_vae", "image_size": 32, "channels": 8, "hidden": 32, "lr": 1e-3}
    return _train_tiny(tmp_path_factory, "baseline-run", extractor=extractor, graph={"plugin": "identity"})

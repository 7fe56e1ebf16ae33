"""What docs/plugins.md promises: a third-party oracle package is found through the ``gem`` entry
points, and the offline local-MLLM recipe runs.

The example package (docs/examples/gem-brightness-oracle) is not pip-installed: the test lays out
what ``pip install`` would leave in site-packages -- the module and a
``gem_brightness_oracle-0.1.dist-info`` folder with ``METADATA`` and ``entry_points.txt`` -- in a
temporary folder and puts that folder on ``sys.path``, so ``importlib.metadata`` (and so pluggy's
``load_setuptools_entrypoints``) finds the distribution exactly as it would an installed one.
"""

import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gem.cli import run_main
from gem.pipeline import run_recipe
from gem.plugins import Registry, describe_plugins, make_plugin_manager, plugin_sources
from gem.recipe import validate_recipe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "gem-brightness-oracle"
MODULE = "gem_brightness_oracle"
DIST, VERSION = "gem_brightness_oracle", "0.1"
ENTRY_POINTS = ["brightness = gem_brightness_oracle"]


@pytest.fixture(autouse=True)
def one_thread():
    # Two shared cores: one torch thread (the recipes below also say training.threads=1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder laid out like site-packages after ``pip install docs/examples/gem-brightness-oracle``."""
    folder = tmp_path / "site"
    folder.mkdir()
    shutil.copy(EXAMPLE / f"{MODULE}.py", folder)
    info = folder / f"{DIST}-{VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {VERSION}\n")
    (info / "entry_points.txt").write_text("[gem]\n" + "\n".join(ENTRY_POINTS) + "\n")
    monkeypatch.syspath_prepend(str(folder))  # also invalidates the import caches
    yield folder
    sys.modules.pop(MODULE, None)


def test_example_package_declares_what_the_test_installs():
    cfg = configparser.ConfigParser()
    cfg.read(EXAMPLE / "setup.cfg")
    assert cfg["metadata"]["name"] == DIST and cfg["metadata"]["version"] == VERSION
    assert cfg["options"]["py_modules"].strip() == MODULE
    declared = [line.strip() for line in cfg["options.entry_points"]["gem"].splitlines() if line.strip()]
    assert declared == ENTRY_POINTS
    assert (EXAMPLE / f"{MODULE}.py").is_file()
    assert 'build-backend = "setuptools.build_meta"' in (EXAMPLE / "pyproject.toml").read_text()
    readme = (EXAMPLE / "README.md").read_text()
    assert ENTRY_POINTS[0] in readme and "gem plugins" in readme


def test_entry_point_makes_the_oracle_available(site):
    pm = make_plugin_manager()
    assert plugin_sources(pm)["brightness"] == f"{DIST} {VERSION}"
    record = next(r for r in describe_plugins(pm) if r["plugin"] == "brightness")
    assert record["package"] == DIST and record["version"] == VERSION
    assert record["registers"] == {"oracle": ["brightness"]}
    registry = Registry(pm)
    reg = registry.get("oracle", "brightness")
    assert reg.plugin == "brightness" and "brightness" in reg.description
    # Its options dataclass is what the recipe validator checks.
    recipe = validate_recipe({"oracle": {"plugin": "brightness", "gain": 2}}, registry)
    assert recipe.plugin_options["oracle"].gain == 2.0
    oracle = reg.build(recipe.plugin_options["oracle"], None)
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    images[1] = 255
    images[2, :4] = 255  # half white: luminance 127.5 -> 2.5 * gain 2 = 5
    scores = oracle.score(images, np.arange(3), ["a", "b"])
    assert np.isnan(scores[:2]).all()  # blank images: no answer, NaN (never 0)
    np.testing.assert_array_equal(scores[2], [5, 5])
    assert oracle.stats() == {"images": 3, "blank": 2} and oracle.cache_key.startswith("brightness/")


def test_run_with_the_third_party_oracle(site, tiny_recipe, tmp_path):
    tiny_recipe["oracle"] = {"plugin": "brightness"}
    tiny_recipe["scoring"]["n_images"] = 40
    tiny_recipe["training"].update(steps=4, warmup_steps=2, threads=1)
    registry = Registry(make_plugin_manager())
    recipe = validate_recipe(tiny_recipe, registry)
    result = run_recipe(recipe, registry, tmp_path / "run")
    assert result.metrics["oracle"]["images"] == 40 and result.metrics["oracle"]["images_scored"] == 40
    assert (tmp_path / "run" / "report.html").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["oracle"] == {"plugin": "brightness", "gain": 1.0, "skip_blank": True}


def test_gem_plugins_command_lists_it(site, tmp_path):
    script = Path(sys.executable).with_name("gem")
    command = [str(script)] if script.is_file() else [sys.executable, "-c", "import sys; from gem.cli import main; sys.exit(main())"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    elsewhere = tmp_path / "elsewhere"  # not the site folder: only PYTHONPATH can find the package
    elsewhere.mkdir()
    out = subprocess.run([*command, "plugins"], capture_output=True, text=True, check=True, env=env,
                         cwd=elsewhere, timeout=120).stdout
    line = next(line for line in out.splitlines() if line.strip().startswith("brightness"))
    assert f"{DIST} {VERSION}" in line and "plugin brightness" in line


# -- Running offline with a local MLLM (docs/plugins.md) --------------------------------------


def test_gem_run_with_a_local_llava_folder_offline(tiny_recipe, tmp_path, monkeypatch):
    from tiny_llava import build_tiny_llava

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_tiny_llava(tmp_path / "models" / "tiny-llava")
    tiny_recipe["oracle"] = {"plugin": "llava", "model": str(model), "batch_size": 16}
    tiny_recipe["scoring"]["n_images"] = 16
    tiny_recipe["training"].update(steps=4, warmup_steps=2, threads=1)
    path = tmp_path / "llava.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert run_main([str(path), "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    n_attributes = 6  # the synthetic data set's default factors
    assert metrics["oracle"]["images_scored"] == 16 and metrics["oracle"]["prompts"] == 16 * n_attributes
    assert metrics["oracle"]["cache_hits"] == 0
    rows = (tmp_path / "run" / "scores.csv").read_text().splitlines()
    assert len(rows) == 17

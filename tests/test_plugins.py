"""Plugin discovery: built-ins through entry points, third parties the same way."""

import json
import re
import subprocess
import sys
import types
from dataclasses import dataclass

import pytest

import gem
from gem import hookimpl
from gem.plugins import (PluginError, Registry, broken_entry_points, describe_plugins, make_plugin_manager,
                         plugin_sources)


def test_builtins_are_named_with_their_package():
    sources = plugin_sources(make_plugin_manager())
    for name in ("synthetic", "gem_vae", "labels_oracle", "somersd", "graph_learners"):
        assert sources[name] == f"gem-disentangle {gem.__version__}"


def test_every_stage_has_a_builtin(registry):
    assert "synthetic" in registry.names("dataset")
    assert "gem_vae" in registry.names("extractor")
    assert "labels" in registry.names("oracle")
    assert "somersd" in registry.names("ranker")
    assert {"gcn", "fixed", "identity"} <= set(registry.names("graph"))


def test_duplicate_name_is_an_error_when_used_naming_both_plugins():
    thief = types.SimpleNamespace(gem_register_rankers=hookimpl(lambda register: register("somersd", object)))
    registry = Registry(make_plugin_manager(extra_plugins=(thief,)))
    assert "somersd" in registry.names("ranker") and registry.get("graph", "gcn")  # the rest still works
    with pytest.raises(PluginError, match=r"ranker 'somersd' is registered by 2 plugins: plugin 'somersd' of "
                                          r"gem-disentangle .* and plugin '\d+' of no installed package"):
        registry.get("ranker", "somersd")


@pytest.fixture
def acme_site(tmp_path, monkeypatch):
    """Two packages laid out as pip leaves them: acme-gem, whose entry point takes a built-in's name
    and registers a built-in oracle name, and broken-gem, whose entry point does not import."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "acme_gem.py").write_text(
        "from gem import hookimpl\n"
        "class Oracle:\n    pass\n"
        "@hookimpl\n"
        "def gem_register_oracles(register):\n"
        "    register('labels', Oracle, description='acme labels')\n"
        "    register('acme', Oracle, description='acme oracle')\n")
    for dist, version, entry in [("acme-gem", "1.0", "synthetic = acme_gem"), ("broken-gem", "0.3", "broken = broken_gem_missing")]:
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[gem]\n{entry}\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("acme_gem", None)


def test_an_entry_point_named_like_a_builtin_is_kept_and_a_clash_names_both_packages(acme_site):
    pm = make_plugin_manager()
    assert plugin_sources(pm)["acme-gem:synthetic"] == "acme-gem 1.0"  # not dropped
    registry = Registry(pm)
    assert "acme" in registry.names("oracle") and registry.get("oracle", "acme").plugin == "acme-gem:synthetic"
    assert registry.get("dataset", "synthetic")  # the built-in keeps its name
    with pytest.raises(PluginError, match=r"oracle 'labels' is registered by 2 plugins: plugin 'labels_oracle' of "
                                          r"gem-disentangle \S+ and plugin 'acme-gem:synthetic' of acme-gem 1\.0; .*"
                                          r"pip uninstall acme-gem"):
        registry.get("oracle", "labels")
    broken = broken_entry_points(pm)
    assert [(b["entry_point"], b["package"]) for b in broken] == [("broken", "broken-gem 0.3")]
    assert "ModuleNotFoundError" in broken[0]["error"]
    records = {r["plugin"]: r for r in describe_plugins(pm)}
    assert records["acme-gem:synthetic"]["conflicts"] == ["oracle labels"]
    assert records["labels_oracle"]["conflicts"] == ["oracle labels"]


def test_gem_plugins_lists_a_conflict_and_a_broken_package_and_a_run_that_uses_it_fails(acme_site, capsys, tmp_path):
    from gem.cli import main, run_main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"labels .*\[plugin labels_oracle, gem-disentangle .*CONFLICT", out)
    assert re.search(r"labels .*acme labels  \[plugin acme-gem:synthetic, acme-gem 1\.0\]  CONFLICT", out)
    assert "not loaded: entry point 'broken' of broken-gem 0.3: ModuleNotFoundError" in out
    assert run_main(["--set", "training.steps=1", "--print-recipe"]) == 2  # the default recipe's oracle is labels
    assert "oracle 'labels' is registered by 2 plugins" in capsys.readouterr().err


def test_misspelt_hook_is_caught():
    bad = types.SimpleNamespace(gem_register_oracle=hookimpl(lambda register: None))
    with pytest.raises(Exception, match="gem_register_oracle"):
        make_plugin_manager(extra_plugins=(bad,))


def test_options_must_be_a_dataclass():
    bad = types.SimpleNamespace(gem_register_rankers=hookimpl(lambda register: register("x", object, options=dict)))
    with pytest.raises(PluginError, match="must be a dataclass"):
        Registry(make_plugin_manager(extra_plugins=(bad,)))


def test_describe_plugins_lists_package_and_registrations():
    records = {r["plugin"]: r for r in describe_plugins(make_plugin_manager())}
    assert records["graph_learners"]["package"] == "gem-disentangle"
    assert records["graph_learners"]["version"] == gem.__version__
    assert set(records["graph_learners"]["registers"]["graph"]) == {"gcn", "fixed", "identity", "calibrated"}


def test_gem_plugins_cli_text_and_json():
    out = subprocess.run([sys.executable, "-c", "import sys; from gem.cli import main; sys.exit(main(['plugins']))"],
                         capture_output=True, text=True, check=True).stdout
    for stage in ("dataset:", "extractor:", "oracle:", "ranker:", "graph:"):
        assert stage in out
    assert "gem-disentangle" in out
    data = json.loads(subprocess.run([sys.executable, "-c", "import sys; from gem.cli import main; sys.exit(main(['plugins', '--json']))"],
                                     capture_output=True, text=True, check=True).stdout)
    assert any(r["plugin"] == "somersd" for r in data)


def test_core_directory_is_never_imported_as_core():
    import gem.pipeline  # noqa: F401  (imports most of the core)
    assert "core" not in sys.modules and "hooks" not in sys.modules


# A third-party plugin, written as an outside package would write it.
@dataclass
class ConstantOracleOptions:
    level: int = 3


class ConstantPlusLabelsOracle:
    """Scores with the true labels but counts its calls, so the test sees it was used."""

    calls = 0

    def __init__(self, options, context):
        self.scores = context.dataset.attribute_scores
        self.level = options.level

    def score(self, images, indices, attributes):
        type(self).calls += 1
        return self.scores[indices].astype(float)


class ThirdPartyPlugin:
    @hookimpl
    def gem_register_oracles(self, register):
        register("third_party", ConstantPlusLabelsOracle, options=ConstantOracleOptions)


@pytest.fixture
def third_party_pm():
    plugin = ThirdPartyPlugin()
    pm = make_plugin_manager()
    pm.register(plugin, name="third-party-test")
    yield pm
    pm.unregister(plugin)


def test_third_party_oracle_is_discovered_and_used_in_a_run(third_party_pm, tiny_recipe, tmp_path):
    from gem.pipeline import run_recipe
    from gem.recipe import validate_recipe

    registry = Registry(third_party_pm)
    assert registry.get("oracle", "third_party").plugin == "third-party-test"
    tiny_recipe["oracle"] = {"plugin": "third_party", "level": 4}
    tiny_recipe["training"].update(steps=4, warmup_steps=2)
    recipe = validate_recipe(tiny_recipe, registry)
    assert recipe.plugin_options["oracle"].level == 4
    ConstantPlusLabelsOracle.calls = 0
    result = run_recipe(recipe, registry, tmp_path / "run")
    assert ConstantPlusLabelsOracle.calls > 0
    assert result.metrics["oracle"]["images_scored"] == 300


def test_listing_plugins_and_rejecting_a_typo_import_no_heavy_libraries():
    """`gem plugins` and recipe validation must not pay for torch_geometric or transformers."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from gem.cli import main, run_main\n"
            "main(['plugins'])\n"
            "assert run_main(['--set', 'extractor.betta=1']) == 2\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch_geometric', 'transformers', 'matplotlib'})\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    assert "unknown recipe key 'extractor.betta'" in out.stderr


def test_gem_env_reports_versions_devices_threads_plugins_and_folders(capsys, monkeypatch):
    import json

    from gem.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-never-shown")
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["torch"] and info["packages"]["pluggy"]
    assert set(info["devices"]) == {"cuda", "gpus", "mps"}
    assert info["threads"]["torch"] >= 1 and "core(s)" in info["threads"]["gem default"]
    assert "gcn" in info["plugins"]["graph"] and "synthetic" in info["plugins"]["dataset"]
    assert info["cache_dir"].endswith("gem") and info["recipes"]
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "plugins:" in text and "sk-secret" not in text

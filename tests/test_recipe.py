"""Recipe loading, validation and overrides: every error names the key and what is allowed."""

import pytest

from gem.recipe import RecipeError, apply_overrides, load_recipe_file, validate_recipe
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_synthetic_recipe(registry):
    recipe = validate_recipe({}, registry)
    assert recipe.plugin_name("dataset") == "synthetic"
    assert recipe.plugin_name("extractor") == "gem_vae"
    assert recipe.plugin_options["extractor"].lambda_adv == 0.8
    assert recipe.plugin_options["extractor"].lambda_dis == 0.6


def test_shipped_synthetic_recipe_equals_the_built_in_default(registry):
    from gem.recipe import DEFAULT_RECIPE

    shipped = validate_recipe(load_recipe_file(ROOT / "recipes" / "synthetic.yaml"), registry)
    assert shipped.to_dict() == validate_recipe(DEFAULT_RECIPE, registry).to_dict()


def test_every_shipped_recipe_validates(registry):
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        validate_recipe(load_recipe_file(path), registry)


def test_unknown_key_names_key_and_allowed(registry):
    with pytest.raises(RecipeError) as err:
        validate_recipe({"extractor": {"plugin": "gem_vae", "betta": 3}}, registry)
    msg = str(err.value)
    assert "extractor.betta" in msg and "beta" in msg and "lambda_adv" in msg


def test_unknown_top_level_key(registry):
    with pytest.raises(RecipeError, match=r"unknown recipe key 'trainnig'.*training"):
        validate_recipe({"trainnig": {}}, registry)


def test_wrong_type_names_key(registry):
    with pytest.raises(RecipeError, match=r"training.steps.*integer.*str 'many'"):
        validate_recipe({"training": {"steps": "many"}}, registry)
    with pytest.raises(RecipeError, match=r"training.cpu.*true or false"):
        validate_recipe({"training": {"cpu": 1}}, registry)


def test_literal_lists_allowed_values(registry):
    with pytest.raises(RecipeError, match=r"training.mixed_precision.*'no', 'fp16', 'bf16'"):
        validate_recipe({"training": {"mixed_precision": "fp8"}}, registry)


def test_unknown_plugin_lists_installed(registry):
    with pytest.raises(RecipeError) as err:
        validate_recipe({"graph": {"plugin": "gat"}}, registry)
    msg = str(err.value)
    assert "graph.plugin" in msg and "'gat'" in msg and "gcn" in msg and "fixed" in msg and "identity" in msg


def test_out_of_range_value_is_reported_with_its_section(registry):
    with pytest.raises(RecipeError, match=r"extractor.*beta must be >= 0"):
        validate_recipe({"extractor": {"beta": -1.0}}, registry)


def test_float_accepts_yaml_exponent_strings_and_ints(registry):
    recipe = validate_recipe({"extractor": {"lr": "1e-4", "beta": 2}}, registry)
    assert recipe.plugin_options["extractor"].lr == 1e-4
    assert recipe.plugin_options["extractor"].beta == 2.0


def test_overrides_parse_yaml_values():
    data = apply_overrides({"training": {"steps": 10}}, ["training.steps=500", "extractor.beta=2.5",
                                                         "training.cpu=true", "dataset.factors=[a, b]"])
    assert data["training"]["steps"] == 500
    assert data["extractor"] == {"beta": 2.5}
    assert data["training"]["cpu"] is True
    assert data["dataset"]["factors"] == ["a", "b"]


def test_override_errors():
    with pytest.raises(RecipeError, match="expected key.path=value"):
        apply_overrides({}, ["training.steps"])
    with pytest.raises(RecipeError, match="'name' is not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: ok\ntraining:\n  steps: [1, 2\n")
    with pytest.raises(RecipeError, match=r"malformed YAML at line \d+"):
        load_recipe_file(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe_file(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips(registry):
    recipe = validate_recipe({"extractor": {"beta": 3.0}, "graph": "fixed"}, registry)
    again = validate_recipe(recipe.to_dict(), registry)
    assert again.to_dict() == recipe.to_dict()
    assert recipe.to_dict()["graph"] == {"plugin": "fixed", "scale": 1.0}


# Shipped recipes: by name from any folder (`gem-run celeba`), and `gem recipes`

SHIPPED = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def test_a_bare_name_or_recipes_path_finds_the_shipped_recipe(tmp_path, monkeypatch):
    from gem.recipe import find_recipe, shipped_recipes

    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    assert list(shipped_recipes()) == SHIPPED
    found = find_recipe("celeba")  # recipes/ of this checkout, or gem/recipes of an installed gem
    assert found == find_recipe("recipes/celeba.yaml") and found.name == "celeba.yaml"
    assert found.read_text() == (ROOT / "recipes" / "celeba.yaml").read_text()
    assert load_recipe_file("shapes3d") == load_recipe_file(ROOT / "recipes" / "shapes3d.yaml")
    (tmp_path / "celeba").write_text("name: mine\n")  # an existing file always wins
    assert load_recipe_file("celeba") == {"name": "mine"}
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "celeba.yaml").write_text("name: also-mine\n")
    assert load_recipe_file("recipes/celeba.yaml") == {"name": "also-mine"}


def test_an_unknown_recipe_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=r"unknown recipe 'celebb': .*shipped recipes: " + ", ".join(SHIPPED)):
        load_recipe_file("celebb")
    with pytest.raises(RecipeError, match=r"recipe file 'recipes/celebb.yaml' does not exist .*celeba, "):
        load_recipe_file("recipes/celebb.yaml")
    with pytest.raises(RecipeError, match=r"recipe file 'celeba.yaml' does not exist"):
        load_recipe_file("celeba.yaml")  # a file name is a path: only bare names are looked up


def test_gem_recipes_lists_each_shipped_recipe_on_one_line(capsys):
    from gem.cli import main

    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == SHIPPED
    described = dict(line.split(None, 1) for line in lines)  # every recipe has its one line
    assert described["synthetic"] == "The default recipe: GEM on the built-in correlated synthetic data, fully offline"
    assert described["celeba"].startswith("GEM on CelebA (Xie et al., NeurIPS 2024")


def test_gem_run_runs_a_shipped_recipe_by_name(tmp_path, monkeypatch, capsys):
    import yaml

    from gem.cli import run_main

    monkeypatch.chdir(tmp_path)
    assert run_main(["dsprites", "--print-recipe", "--set", "training.steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["name"] == "dsprites" and printed["dataset"]["plugin"] == "dsprites"
    assert printed["training"]["steps"] == 7


def test_switching_a_plugin_drops_inherited_keys_it_does_not_take(registry):
    from gem.recipe import override_recipe

    base = load_recipe_file(ROOT / "recipes" / "synthetic.yaml")
    data, notes = override_recipe(base, ["graph.plugin=fixed", "training.steps=10"], registry)
    assert data["graph"] == {"plugin": "fixed"} and data["training"]["steps"] == 10
    assert notes == ["graph.plugin=fixed: dropped the inherited graph.hidden, graph.layers, graph.anchor_weight, "
                     "which fixed does not take"]
    validate_recipe(data, registry)
    # Keys the new plugin shares are kept; the base is not modified.
    data, notes = override_recipe(base, ["extractor.plugin=beta_vae"], registry)
    assert data["extractor"]["beta"] == base["extractor"]["beta"] and data["extractor"]["lr"] == base["extractor"]["lr"]
    assert "extractor.disc_lr" in notes[0] and "extractor.beta," not in notes[0]
    assert validate_recipe(data, registry).plugin_options["extractor"].beta == base["extractor"]["beta"]
    assert base["extractor"]["plugin"] == "gem_vae" and "disc_lr" in base["extractor"]


def test_a_key_set_explicitly_for_the_wrong_plugin_is_still_an_error(registry):
    from gem.recipe import override_recipe

    base = load_recipe_file(ROOT / "recipes" / "synthetic.yaml")
    data, _ = override_recipe(base, ["extractor.plugin=beta_vae", "extractor.disc_lr=0.1"], registry)
    with pytest.raises(RecipeError, match="'extractor.disc_lr'"):
        validate_recipe(data, registry)
    # The same plugin, or no plugin change, drops nothing.
    data, notes = override_recipe(base, ["graph.plugin=gcn"], registry)
    assert notes == [] and data == apply_overrides(base, ["graph.plugin=gcn"])
    # An unknown plugin is left to validation, which lists the installed ones.
    data, notes = override_recipe(base, ["graph.plugin=gat"], registry)
    with pytest.raises(RecipeError, match="gat"):
        validate_recipe(data, registry)

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

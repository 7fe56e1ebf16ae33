"""gem compare: variants resolve to valid recipes, and a tiny comparison writes its table."""

import json
import subprocess
import sys

import pytest

from gem.compare import COLUMNS, VARIANTS, Variant, compare, format_table, parse_variant, plan_runs, summarise
from gem.recipe import DEFAULT_RECIPE, RecipeError, validate_recipe


@pytest.fixture
def base(registry):
    return validate_recipe(DEFAULT_RECIPE, registry).to_dict()


def test_every_builtin_variant_is_a_valid_recipe(base, registry, tmp_path):
    plan = plan_runs(base, list(VARIANTS), [0, 1], tmp_path, VARIANTS, registry)
    assert len(plan) == 2 * len(VARIANTS)
    recipes = {(r.variant, r.seed): validate_recipe(d, registry) for r, d in plan}
    assert recipes[("gem", 1)].seed == 1
    # Baselines keep the base's networks and learning rate but their own paper defaults.
    tc = recipes[("beta_tcvae", 0)]
    assert tc.plugin_name("extractor") == "beta_tcvae" and tc.plugin_name("graph") == "identity"
    assert tc.plugin_options["extractor"].beta == 6.0
    assert tc.plugin_options["extractor"].lr == base["extractor"]["lr"]
    # The annealed capacity grows over the run's own length.
    assert recipes[("annealed_vae", 0)].plugin_options["extractor"].capacity_steps == base["training"]["steps"]


def test_ablations_change_only_what_they_name(base, registry, tmp_path):
    plan = {r.variant: validate_recipe(d, registry) for r, d in plan_runs(
        base, ["gem", "gem_single", "gem_no_graph_learner", "gem_no_adversarial", "gem_plain_vae"], [0],
        tmp_path, VARIANTS, registry)}
    gem = plan["gem"]
    assert (gem.plugin_name("graph"), gem.plugin_options["extractor"].adversarial) == ("gcn", True)
    single = plan["gem_single"]
    assert (single.plugin_name("graph"), single.plugin_options["extractor"].adversarial) == ("fixed", False)
    no_graph = plan["gem_no_graph_learner"]
    assert (no_graph.plugin_name("graph"), no_graph.plugin_options["extractor"].adversarial) == ("fixed", True)
    no_adv = plan["gem_no_adversarial"]
    assert (no_adv.plugin_name("graph"), no_adv.plugin_options["extractor"].adversarial) == ("gcn", False)
    plain = plan["gem_plain_vae"]
    assert plain.plugin_options["extractor"].beta == 1.0
    assert plain.plugin_options["extractor"].lambda_adv == gem.plugin_options["extractor"].lambda_adv
    assert plain.plugin_options["graph"] == gem.plugin_options["graph"]


def test_unknown_method_and_bad_variant_are_reported(base, registry, tmp_path):
    with pytest.raises(RecipeError, match="unknown method.*nope.*known: vae"):
        plan_runs(base, ["nope"], [0], tmp_path, VARIANTS, registry)
    bad = {"bad": Variant("x", {"extractor": {"plugin": "beta_vae", "beta": -1}})}
    with pytest.raises(ValueError, match="beta must be >= 0"):
        plan_runs(base, ["bad"], [0], tmp_path, bad, registry)
    name, variant = parse_variant(["b8", "extractor.plugin=beta_vae", "extractor.beta=8", "graph.plugin=identity"])
    data = variant.recipe(base)
    assert name == "b8" and data["extractor"]["beta"] == 8 and "lambda_adv" not in data["extractor"]
    with pytest.raises(RecipeError, match="stage.key=value"):
        parse_variant(["x", "seed=3"])


def test_table_is_mean_and_sample_std(tmp_path):
    from gem.compare import RunRecord

    records = [RunRecord("a", s, tmp_path, "done", metrics={"disentanglement": {"exogenous": {"mig": v}}})
               for s, v in enumerate([0.1, 0.3])]
    records.append(RunRecord("b", 0, tmp_path, "failed", error="boom"))
    rows = summarise(records, ["a", "b"])
    assert rows[0]["MIG μ"]["mean"] == pytest.approx(0.2)
    assert rows[0]["MIG μ"]["std"] == pytest.approx(0.1414213562)  # ddof = 1
    assert rows[0]["MIG Aᵀμ"]["mean"] is None
    assert rows[1]["seeds"] == 0 and rows[1]["failed"] == 1 and rows[1]["MIG μ"]["mean"] is None
    table = format_table(rows)
    assert "**0.200 ± 0.141**" in table and "0 (1 failed)" in table


def test_tiny_comparison_writes_table_and_reuses_finished_runs(tiny_recipe, tmp_path, monkeypatch):
    # Started from a folder that holds a folder named gem (a clone, a run folder of the method gem):
    # the workers must still import the installed package.
    (tmp_path / "gem").mkdir()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cmp"
    settings = {"n_train": 100, "n_test": 50, "dci_n_train": 100, "dci_n_test": 50, "dci_trees": 5, "n_boot": 5,
                "efficiency_steps": 2}
    records = compare(tiny_recipe, ["beta_vae", "gem"], [0], out, jobs=2, threads=1, eval_settings=settings,
                      log=lambda line: None)
    assert [(r.variant, r.status) for r in records] == [("beta_vae", "done"), ("gem", "done")], \
        [r.error for r in records]
    table = (out / "table.md").read_text()
    assert "| beta_vae | 1 |" in table and "| gem | 1 |" in table
    assert all(label in table for label, *_ in COLUMNS)
    results = json.loads((out / "results.json").read_text())
    gem_row = next(r for r in results["rows"] if r["method"] == "gem")
    flat_row = next(r for r in results["rows"] if r["method"] == "beta_vae")
    # GEM learns relations from S; the flat baseline's graph is the identity, so its two codes are one.
    assert gem_row["|A−true| MAE"]["mean"] < flat_row["|A−true| MAE"]["mean"]
    assert flat_row["MCC μ"]["values"] == flat_row["MCC Aᵀμ"]["values"]
    assert "independent factors" in (out / "report.md").read_text()
    assert (out / "figures" / "comparison.png").stat().st_size > 0
    assert "gem_vae" in (out / "runs" / "gem-s0" / "recipe.yaml").read_text()
    again = compare(tiny_recipe, ["beta_vae"], [0], out, jobs=1, threads=1, eval_settings=settings,
                    log=lambda line: None)
    assert again[0].status == "reused"
    tiny_recipe["training"]["steps"] += 1  # a changed recipe is trained again, not reused
    changed = compare(tiny_recipe, ["beta_vae"], [0], out, jobs=1, threads=1, eval_settings=settings,
                      log=lambda line: None)
    assert changed[0].status == "done"


def test_failed_run_is_recorded_not_fatal(tiny_recipe, tmp_path):
    out = tmp_path / "cmp"
    crash = {"crash": Variant("nan learning rate", {"extractor": {"plugin": "beta_vae", "lr": 1e30}})}
    records = compare(tiny_recipe, ["crash"], [0], out, jobs=1, threads=1, variants=crash,
                      eval_settings={"n_train": 50, "n_test": 20, "efficiency_steps": 1}, log=lambda line: None)
    assert records[0].status == "failed" and "log:" in records[0].error
    assert "Failed runs" in (out / "report.md").read_text()


NEW_METHODS = ["joint_vae", "rf_vae", "ivae", "ivae_ddpm", "dear", "infogan", "disdiff"]


def test_remaining_paper_methods_are_listed_and_run_through_compare(tiny_recipe, tmp_path):
    listing = subprocess.run([sys.executable, "-m", "gem.cli", "plugins"], capture_output=True, text=True, check=True)
    for name in NEW_METHODS:
        assert f"\n  {name} " in listing.stdout, name
    out = tmp_path / "cmp"
    settings = {"n_train": 60, "n_test": 30, "dci_n_train": 60, "dci_n_test": 30, "dci_trees": 3, "n_boot": 3,
                "efficiency_steps": 1}
    records = compare(tiny_recipe, NEW_METHODS, [0], out, jobs=2, threads=1, eval_settings=settings,
                      log=lambda line: None)
    assert [(r.variant, r.status) for r in records] == [(m, "done") for m in NEW_METHODS], \
        [r.error for r in records]
    table = (out / "table.md").read_text()
    for name in NEW_METHODS:
        assert f"| {name} | 1 |" in table
        metrics = json.loads((out / "runs" / f"{name}-s0" / "metrics.json").read_text())
        assert "disentanglement" in metrics and "relations" in metrics, name
    # The diffusion methods also write traversals through their sampler, and the report shows them.
    for name in ("ivae_ddpm", "disdiff"):
        run = out / "runs" / f"{name}-s0"
        assert (run / "figures" / "traversal_relation_aware_diffusion.png").stat().st_size > 0
        assert "traversal_relation_aware_diffusion.png" in (run / "report.md").read_text()


def test_relation_aware_baselines_use_the_base_graph(base, registry, tmp_path):
    from gem.compare import relation_aware

    aware = relation_aware(VARIANTS)
    plan = {r.variant: d for r, d in plan_runs(base, ["beta_vae", "dear", "gem_single"], [0], tmp_path, aware, registry)}
    assert plan["beta_vae"]["graph"]["plugin"] == base["graph"]["plugin"] == "gcn"
    assert plan["dear"]["graph"]["plugin"] == "gcn" and plan["dear"]["extractor"]["plugin"] == "dear"
    assert plan["gem_single"]["graph"]["plugin"] == "fixed"  # a variant that chooses its graph keeps it
    flat = {r.variant: d for r, d in plan_runs(base, ["beta_vae"], [0], tmp_path, VARIANTS, registry)}
    assert flat["beta_vae"]["graph"]["plugin"] == "identity"


def test_sweep_runs_one_comparison_per_value_and_plots_against_it(tiny_recipe, tmp_path):
    from gem.compare import SWEEP_COLUMNS, parse_sweep, sweep

    assert parse_sweep("dataset.strength=0, 0.5") == ("dataset.strength", ["0", "0.5"])
    for bad in ("dataset.strength=0", "strength=0,1", "dataset.strength"):
        with pytest.raises(RecipeError, match="stage.key=value1,value2"):
            parse_sweep(bad)
    out = tmp_path / "sweep"
    settings = {"metrics": ["disentanglement", "relations"], "n_train": 100, "n_test": 50, "dci_n_train": 100,
                "dci_n_test": 50, "dci_trees": 5, "n_boot": 5}
    with pytest.raises(RecipeError, match=r"--sweep dataset.strength=2.*strength must be in"):
        sweep(tiny_recipe, "dataset.strength", ["0", "2"], ["beta_vae"], [0], out, eval_settings=settings,
              log=lambda line: None)
    assert not out.exists()   # a bad value stops the sweep before anything trains
    records = sweep(tiny_recipe, "dataset.strength", ["0", "0.5"], ["beta_vae"], [0], out, jobs=2, threads=1,
                    eval_settings=settings, log=lambda line: None)
    assert {v: [r.status for r in recs] for v, recs in records.items()} == {"0": ["done"], "0.5": ["done"]}
    for value in ("0", "0.5"):
        recipe = (out / f"dataset.strength={value}" / "runs" / "beta_vae-s0" / "recipe.yaml").read_text()
        assert f"strength: {value}" in recipe
    table = (out / "sweep.md").read_text()
    assert "| beta_vae | 0 |" in table and "| beta_vae | 0.5 |" in table
    assert all(label in table for label, *_ in SWEEP_COLUMNS)
    assert len((out / "sweep.csv").read_text().splitlines()) == 3
    assert (out / "figures" / "sweep.png").stat().st_size > 10_000
    again = sweep(tiny_recipe, "dataset.strength", ["0", "0.5"], ["beta_vae"], [0], out, jobs=1, threads=1,
                  eval_settings=settings, log=lambda line: None)
    assert [r.status for recs in again.values() for r in recs] == ["reused", "reused"]


def test_a_sweep_warns_about_a_method_whose_recipe_drops_the_swept_key(tmp_path):
    import logging

    from gem.compare import plan_sweep

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("gem")
    logger.addHandler(handler)
    try:
        plan_sweep(DEFAULT_RECIPE, "extractor.beta", ["1", "16"], ["gem", "beta_vae"], [0], tmp_path, VARIANTS)
        warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "method 'beta_vae' does not take this value" in warned[0]
        records.clear()
        plan_sweep(DEFAULT_RECIPE, "dataset.strength", ["0", "0.9"], ["gem", "beta_vae"], [0], tmp_path, VARIANTS)
        assert not [r for r in records if r.levelno == logging.WARNING]
    finally:
        logger.removeHandler(handler)

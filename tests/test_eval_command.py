"""``gem eval``: evaluating a finished run folder after the fact."""

import copy
import hashlib
import json
import math
import textwrap

import numpy as np
import pytest
import torch
import yaml

from gem.cli import run_main
from gem.evaluation import EvalSettings, evaluate_run
from gem.run_folder import load_run

# Small settings so that every call stays around a second on two CPU cores.
FAST = dict(n_train=150, n_test=100, dci_trees=5, n_boot=20, efficiency_steps=1, efficiency_warmup=1)


def fast(**changes) -> EvalSettings:
    return EvalSettings(**{**FAST, **changes})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import TINY_RECIPE

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("eval")
    recipe = dict(copy.deepcopy(TINY_RECIPE), cache_dir=str(tmp / "cache"), out=str(tmp / "runs"))
    recipe["training"] = dict(recipe["training"], steps=8, warmup_steps=4)
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp / "run"
    assert run_main([str(path), "--out", str(run_dir)]) == 0
    return run_dir


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    """One full evaluation of the tiny run (module-wide; later tests only read it)."""
    before = json.loads((tiny_run / "metrics.json").read_text())
    model_hash = hashlib.sha256((tiny_run / "model.pt").read_bytes()).hexdigest()
    result = evaluate_run(tiny_run, settings=fast())
    return {"before": before, "result": result, "model_hash": model_hash}


def test_split_indices_match_what_the_run_wrote(tiny_run):
    run = load_run(tiny_run)
    assert len(run.split.held_out) == 40 and run.split.held_out[-1] == len(run.dataset) - 1
    assert np.array_equal(run.split.train, np.arange(len(run.dataset) - 40))
    assert np.array_equal(run.split.scored, run.score_indices) and not run.notes
    assert run.scores.shape == (300, len(run.attributes))
    assert not run.extractor.training
    # The loaded graph is the one the run learned.
    impact = json.loads((tiny_run / "impact.json").read_text())
    np.testing.assert_allclose(run.learned_adjacency, np.array(impact["learned_adjacency"]), atol=1e-6)


def test_evaluate_run_writes_sections_and_figures(tiny_run, evaluated):
    result, before = evaluated["result"], evaluated["before"]
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for section in ("disentanglement", "reconstruction", "fidelity", "relations", "oracle_quality", "efficiency"):
        assert section in metrics and section in result, section
    # Existing sections and keys are kept.
    for key in ("binding", "oracle", "training", "data"):
        assert metrics[key] == before[key]
    assert set(metrics["disentanglement"]["bound_rho"]) == set(before["disentanglement"]["bound_rho"])
    dis = metrics["disentanglement"]
    for code in ("exogenous", "attribute"):
        for key in ("mig", "dci_disentanglement", "sap", "modularity", "factorvae_score", "betavae_score"):
            assert math.isfinite(dis[code][key]), (code, key)
    assert dis["evaluation"]["pool"] == 250 and dis["evaluation"]["factor_set"] == "independent"
    rec = metrics["reconstruction"]
    assert rec["mse"] == before["reconstruction"]["mse"]   # one definition, the same held-out images
    assert 0 < rec["ssim"] <= 1 and rec["n_images"] == 40
    rels = metrics["relations"]
    low, high = rels["oracle_vs_true"]["mae_ci"]
    assert low <= high and rels["oracle_vs_true"]["mae"] < 0.1
    assert "learned_vs_true" in rels and "learned_vs_oracle" in rels
    edges = metrics["relation_edges"]
    n = len(edges["attributes"])
    assert np.array(edges["oracle_error_ci_high"]).shape == (n, n)
    # The bootstrap's point estimate is the run's own S.
    impact = json.loads((tiny_run / "impact.json").read_text())
    np.testing.assert_allclose(np.array(edges["oracle_impact"]), np.array(impact["oracle_impact"]), atol=1e-9)
    assert metrics["oracle_quality"]["accuracy_mean"] == pytest.approx(1.0)   # the labels oracle, no errors
    eff = metrics["efficiency"]
    assert eff["params_m"] > 0 and eff["gflops_per_image"] > 0 and eff["seconds_per_step"] > 0
    assert eff["seconds_per_epoch"] == pytest.approx(eff["seconds_per_step"] * eff["steps_per_epoch"])
    assert set(result["seconds"]) >= {"disentanglement", "reconstruction", "relations", "efficiency", "total"}
    assert metrics["eval"]["settings"]["n_train"] == 150
    for name in ("disentanglement.png", "relation_error.png"):
        assert (tiny_run / "figures" / name).stat().st_size > 1000
    # The efficiency steps ran on a copy: the saved model is untouched.
    assert hashlib.sha256((tiny_run / "model.pt").read_bytes()).hexdigest() == evaluated["model_hash"]


def test_report_shows_the_new_sections(tiny_run, evaluated):
    html = (tiny_run / "report.html").read_text()
    for text in ("Disentanglement", "dci_disentanglement", "Efficiency", "gflops_per_image", "Fidelity", "ssim"):
        assert text in html, text


def test_deterministic_for_a_fixed_seed(tiny_run, evaluated):
    again = evaluate_run(tiny_run, ["disentanglement", "relations"], settings=fast())
    first = evaluated["result"]
    for code in ("exogenous", "attribute"):
        assert first["disentanglement"][code] and again["disentanglement"][code] == first["disentanglement"][code]
    assert again["relations"]["oracle_vs_true"] == first["relations"]["oracle_vs_true"]
    other = evaluate_run(tiny_run, ["mig"], settings=fast(seed=1), write_report=False)
    assert set(other) >= {"disentanglement"} and "relations" not in other
    assert other["disentanglement"]["evaluation"]["seed"] == 1
    assert set(other["disentanglement"]) == {"exogenous", "attribute", "evaluation"}
    assert set(other["disentanglement"]["exogenous"]) == set(other["disentanglement"]["attribute"]) == {"mig"}


def test_dci_alone_on_a_smaller_split(tiny_run, evaluated):
    from gem.disentanglement import compute_disentanglement
    from gem.training import encode_images

    result = evaluate_run(tiny_run, ["mig", "dci"], settings=fast(dci_n_train=60, dci_n_test=40), write_report=False)
    dis = result["disentanglement"]
    first = evaluated["result"]["disentanglement"]
    assert dis["evaluation"]["dci_n_train"] == 60 and dis["exogenous"]["mig"] == first["exogenous"]["mig"]
    # The same numbers as compute_disentanglement on both codes of the independent pool.
    run = load_run(tiny_run)
    images, rows = run.dataset.independent_sample(250, 0)
    mu = torch.from_numpy(encode_images(run.extractor, images.images, rows, run.device))
    with torch.no_grad():
        codes = {"exogenous": run.relation.to_attributes(mu), "attribute": run.relation.to_attributes(run.relation(mu))}
    for code, z in codes.items():
        ref = compute_disentanglement(z.numpy(), images.factors[rows], seed=0, n_train=60, n_test=40,
                                      metrics=["dci"], dci_trees=5)
        assert dis[code]["dci_disentanglement"] == pytest.approx(ref["dci_disentanglement"]), code


def test_the_saved_weights_are_not_changed_by_the_efficiency_step(tiny_run):
    run = load_run(tiny_run)
    state = {k: v.clone() for k, v in run.extractor.state_dict().items()}
    evaluate_run(run, ["efficiency"], settings=fast(efficiency_warmup=0), write_report=False)
    assert all(torch.equal(state[k], v) for k, v in run.extractor.state_dict().items())


def test_fid_without_feature_extractor_is_null_with_a_note(tiny_run, evaluated, monkeypatch):
    from gem import evaluation

    monkeypatch.setattr(evaluation, "_torch_fidelity_available", lambda: False)
    result = evaluate_run(tiny_run, ["fid"], settings=fast(), write_report=False)
    assert result["fidelity"]["fid"] is None
    assert any("torch-fidelity" in note for note in result["notes"])
    assert json.loads((tiny_run / "metrics.json").read_text())["fidelity"]["fid"] is None


def test_fid_and_kid_with_a_feature_extractor_module(tiny_run, evaluated, tmp_path, monkeypatch):
    (tmp_path / "tiny_features_mod.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class TinyFeatures(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.conv = nn.Conv2d(3, 4, 5, stride=4)

            def forward(self, x):
                return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    result = evaluate_run(tiny_run, ["fidelity"], settings=fast(feature_extractor="tiny_features_mod:TinyFeatures"),
                          write_report=False)
    fid = result["fidelity"]
    for key in ("fid", "kid_mean", "kid_std", "fid_samples", "kid_samples_mean"):
        assert math.isfinite(fid[key]), key
    assert fid["fid"] >= 0 and fid["feature_dim"] == 4 and fid["n_images"] == 40
    assert json.loads((tiny_run / "metrics.json").read_text())["fidelity"]["fid"] == pytest.approx(fid["fid"])


def test_gem_eval_cli_prints_a_table(tiny_run, evaluated, capsys):
    from gem.eval_command import eval_main

    code = eval_main([str(tiny_run), "--metrics", "mig,reconstruction", "--n-train", "150", "--n-test", "100"])
    out = capsys.readouterr().out
    assert code == 0
    assert "mig" in out and "psnr" in out and "report:" in out


def test_gem_eval_is_dispatched_by_gem_main(tiny_run, evaluated, capsys):
    import gem.cli

    assert gem.cli.main(["eval", str(tiny_run), "--metrics", "oracle_quality"]) == 0
    assert "accuracy_mean" in capsys.readouterr().out


def test_not_a_run_folder_exits_2_naming_the_missing_file(tmp_path, capsys):
    from gem.eval_command import eval_main

    (tmp_path / "recipe.yaml").write_text("name: x\n")
    assert eval_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.pt" in err and "not a finished gem run" in err
    assert eval_main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_metric_and_bad_feature_extractor_are_user_errors(tiny_run, evaluated, capsys):
    from gem.eval_command import eval_main

    assert eval_main([str(tiny_run), "--metrics", "nope"]) == 2
    assert "unknown metric 'nope'" in capsys.readouterr().err
    assert eval_main([str(tiny_run), "--metrics", "fid", "--feature-extractor", "no_such_mod_xyz:Net"]) == 2
    assert "no_such_mod_xyz" in capsys.readouterr().err


def test_a_run_evaluates_once_in_memory_and_gem_eval_agrees(tmp_path, monkeypatch):
    """gem-run loads nothing back and encodes each image set once; gem eval at the same sizes
    reproduces every number of its metrics.json."""
    from conftest import TINY_RECIPE

    from gem import evaluation, pipeline, run_folder
    from gem.plugins import Registry, make_plugin_manager
    from gem.recipe import validate_recipe

    calls = {"load_run": 0, "encode_images": []}

    def counting(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            if name == "load_run":
                calls["load_run"] += 1
            else:
                calls["encode_images"].append(len(args[2]))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for module in (evaluation, run_folder):
        counting(module, "load_run")
    for module in (evaluation, pipeline):
        counting(module, "encode_images")

    torch.set_num_threads(1)
    data = dict(copy.deepcopy(TINY_RECIPE), cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"))
    data["training"] = dict(data["training"], steps=8, warmup_steps=4)
    data["evaluation"] = dict(data["evaluation"], full_metrics=True)
    registry = Registry(make_plugin_manager())
    recipe = validate_recipe(data, registry)
    run_dir = tmp_path / "run"
    groups = ["disentanglement", "reconstruction", "relations", "oracle_quality"]
    pipeline.run_recipe(recipe, registry, run_dir, eval_metrics=groups, eval_settings=fast())
    assert calls["load_run"] == 0
    # Once for the binding (the scored images), once for the disentanglement pool.
    assert calls["encode_images"] == [300, 250]

    stored = json.loads((run_dir / "metrics.json").read_text())
    result = evaluate_run(run_dir, groups, settings=fast(), write_report=False)
    for section in groups:
        ours = {k: v for k, v in stored[section].items() if k != "evaluation"}
        theirs = json.loads(json.dumps({k: v for k, v in result[section].items() if k != "evaluation"},
                                       default=lambda a: np.asarray(a).tolist()))
        assert ours == theirs, section

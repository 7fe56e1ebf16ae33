"""A tiny run of the whole pipeline through the CLI: every output, and relations that match."""

import json
import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from gem.cli import run_main

EXPECTED_FILES = [
    "recipe.yaml", "scores.csv", "impact.csv", "impact.json", "metrics.json", "history.json",
    "model.pt", "report.md", "report.html",
    "figures/impact_heatmap.png", "figures/relations.png", "figures/traversal_relation_aware.png",
    "figures/traversal_independent.png", "figures/loss_curves.png", "figures/oracle_scores.png",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import TINY_RECIPE

    tmp = tmp_path_factory.mktemp("e2e")
    recipe = dict(TINY_RECIPE, cache_dir=str(tmp / "cache"), out=str(tmp / "runs"))
    recipe["evaluation"] = dict(recipe["evaluation"], full_metrics=True)  # gem eval at the end of the run
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp / "run"
    err, out = io.StringIO(), io.StringIO()
    disabled = os.environ.pop("TQDM_DISABLE", None)  # the suite hides progress; this run shows it
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):  # not a terminal: plain lines
            code = run_main([str(path), "--out", str(run_dir), "--set", "training.steps=16", "--set", "seed=3"])
    finally:
        if disabled is not None:
            os.environ["TQDM_DISABLE"] = disabled
    assert code == 0, err.getvalue()[-3000:]
    (tmp / "stderr.txt").write_text(err.getvalue())
    (tmp / "stdout.txt").write_text(out.getvalue())
    return run_dir


def test_a_run_ends_with_its_report_and_the_command_to_explore_it(tiny_run):
    last = (tiny_run.parent / "stdout.txt").read_text().strip().splitlines()[-2:]
    assert last == [f"report: {tiny_run / 'report.html'}", f"explore: gem explore {tiny_run}"]


def test_every_stage_says_what_it_does_in_plain_lines(tiny_run):
    err = (tiny_run.parent / "stderr.txt").read_text()
    assert "\r" not in err and "\x1b" not in err  # no bar redraws in a log file
    for stage in ("running recipe", "data: ", "scores: ", "ranking: ", "training: ", "latents bound to attributes",
                  "figures: "):
        assert stage in err, stage
    for i, group in enumerate(("disentanglement", "reconstruction", "fidelity", "relations", "oracle_quality",
                               "efficiency"), start=1):
        assert f"evaluation {i}/6: {group}, " in err
        assert f"evaluation: {group} took " in err
    assert "train: 100% (" in err and "disentanglement: 100% (" in err


def test_quiet_hides_progress_and_verbose_adds_debug(tiny_run):
    from gem.eval_command import eval_main

    for flag, expected in (("-q", False), (None, True)):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert eval_main([str(tiny_run), "--metrics", "relations", *([flag] if flag else [])]) == 0
        assert ("evaluation 1/1: relations" in err.getvalue()) is expected, err.getvalue()


def test_every_output_is_written(tiny_run):
    for name in EXPECTED_FILES:
        assert (tiny_run / name).is_file(), name
    assert (tiny_run / "checkpoint").is_dir()
    for png in (tiny_run / "figures").glob("*.png"):
        assert Image.open(png).size[0] > 100


def test_resolved_recipe_has_overrides_and_defaults(tiny_run):
    resolved = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    assert resolved["training"]["steps"] == 16 and resolved["seed"] == 3
    assert resolved["extractor"]["lambda_adv"] == 0.8  # a default, filled in


def test_labels_oracle_relations_match_the_truth(tiny_run):
    impact = json.loads((tiny_run / "impact.json").read_text())
    S = np.array(impact["oracle_impact"], dtype=float)
    true = np.array(impact["true_impact"], dtype=float)
    off = ~np.eye(len(S), dtype=bool)
    # 300 scored images estimate the population value: within sampling error.
    assert np.abs(S - true)[off].max() < 0.2
    assert np.abs(S - true)[off].mean() < 0.06
    strong = np.abs(true) > 0.2
    assert (np.sign(S[strong & off]) == np.sign(true[strong & off])).all()
    low, high = np.array(impact["ci_low"], dtype=float), np.array(impact["ci_high"], dtype=float)
    assert (low <= S + 1e-12).all() and (S <= high + 1e-12).all()


def test_learned_graph_stays_near_its_anchor_and_keeps_signs(tiny_run):
    impact = json.loads((tiny_run / "impact.json").read_text())
    A = np.array(impact["learned_adjacency"], dtype=float)
    S = np.array(impact["oracle_impact"], dtype=float)
    np.testing.assert_allclose(np.diag(A), 1.0)
    off = ~np.eye(len(S), dtype=bool)
    assert np.abs(A - S)[off].max() < 0.1
    nonzero = off & (np.abs(S) > 0.05)
    assert (np.sign(A[nonzero]) == np.sign(S[nonzero])).all()


def test_metrics_and_report(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert 0 < metrics["reconstruction"]["mse"] < 1
    assert metrics["reconstruction"]["psnr"] == pytest.approx(10 * np.log10(1 / metrics["reconstruction"]["mse"]))
    assert metrics["relations"]["oracle_vs_true"]["mae"] < 0.06
    assert metrics["training"]["steps"] == 16
    for code in ("exogenous", "attribute"):
        for key in ("mig", "dci_disentanglement", "sap", "factorvae_score", "spearman_mcc"):
            assert 0 <= metrics["disentanglement"][code][key] <= 1, (code, key)
    assert metrics["disentanglement"]["evaluation"]["factor_set"] == "independent"
    assert metrics["efficiency"]["params_m"] > 0
    assert metrics["oracle"]["images_scored"] == 300 and metrics["oracle"]["missing_scores"] == 0
    history = json.loads((tiny_run / "history.json").read_text())
    assert history[-1]["step"] == 16 and "recon" in history[-1] and "adv_d" in history[-1]
    html = (tiny_run / "report.html").read_text()
    markdown = (tiny_run / "report.md").read_text()
    for needle in ("traversal_relation_aware.png", "traversal_independent.png", "impact_heatmap.png",
                   "loss_curves.png"):
        assert needle in markdown
    for needle in ("Relation recovery", "PSNR"):
        assert needle in html and needle in markdown
    assert html.count('<img src="data:image/png;base64,') >= 6  # report.html holds its figures


def test_scores_csv_matches_dataset_labels(tiny_run):
    rows = (tiny_run / "scores.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert header[0] == "image" and len(header) == 7
    assert len(rows) == 301


def test_bad_recipe_exits_2_with_message_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("extractor:\n  plugin: gem_vae\n  betta: 2\n")
    proc = subprocess.run([sys.executable, "-c", f"import sys; from gem.cli import run_main; sys.exit(run_main([{str(path)!r}]))"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown recipe key 'extractor.betta'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_print_recipe_shows_resolved_defaults(capsys):
    assert run_main(["--print-recipe", "--set", "training.steps=7"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["training"]["steps"] == 7 and out["dataset"]["plugin"] == "synthetic"

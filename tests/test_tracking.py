"""Live tracking through accelerate's trackers: TensorBoard event files written by a run and read back."""

from __future__ import annotations

import pytest
import yaml

from gem.cli import run_main


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(folder.rglob("events.out.tfevents.*"))
    assert events, f"no event file under {folder}"
    values: dict[str, list[tuple[int, float]]] = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return values


def test_a_run_logs_losses_graph_and_evaluation_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from conftest import TINY_RECIPE

    recipe = dict(TINY_RECIPE, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    assert run_main([str(path), "--out", str(run_dir), "--set", "training.steps=16", "--set", "training.log_every=4",
                     "--set", "training.log_with=[tensorboard]", "-q"]) == 0
    scalars = _scalars(run_dir / "tracking")
    history = yaml.safe_load((run_dir / "history.json").read_text())
    # Every loss term at every logged step, with the values of history.json.
    for record in history:
        for term, value in record.items():
            if term != "step":
                assert (record["step"], pytest.approx(value, rel=1e-5)) in [(s, pytest.approx(v)) for s, v in
                                                                           scalars[f"loss/{term}"]], term
    attributes = yaml.safe_load((run_dir / "impact.json").read_text())["attributes"]
    assert f"graph/{attributes[0]}->{attributes[1]}" in scalars
    metrics = yaml.safe_load((run_dir / "metrics.json").read_text())
    mae = metrics["relations"]["learned_vs_true"]["mae"]
    assert scalars["eval/relations/learned_vs_true/mae"][-1][1] == pytest.approx(mae, rel=1e-5)


def test_a_tracker_that_is_not_installed_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert run_main(["--set", "training.log_with=[wandb]", "--set", f"out={tmp_path}", "--set",
                     f"cache_dir={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err
    assert "the 'wandb' tracker needs the package 'wandb'" in err and "pip install wandb" in err
    assert "Traceback" not in err
    assert not any(tmp_path.glob("synthetic-*"))  # nothing was left behind


def test_an_unknown_tracker_names_the_allowed_ones(capsys):
    assert run_main(["--set", "training.log_with=[tensorbord]", "--print-recipe"]) == 2
    err = capsys.readouterr().err
    assert "unknown tracker 'tensorbord'" in err and "tensorboard, wandb, mlflow" in err

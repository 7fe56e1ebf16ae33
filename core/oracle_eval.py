"""How good is a relation oracle? Score images with it and compare with the data set's labels.

The GEM paper (Xie et al., NeurIPS 2024, Sec. 4.4, Figure 6) checks its MLLM oracle against
CelebA's attribute labels: the fraction of correct answers per attribute, and how often the
model gave no usable answer or a "meaningless" all-zero one. :func:`evaluate_oracle` does the
same for any recipe whose data set has labels (``ImageDataset.attribute_scores``): it builds the
recipe's data set and oracle exactly as a run does, scores the first ``n`` images through
:func:`gem.pipeline.score_images` and the persistent score cache (so an evaluation and a run
share every paid-for answer), and compares with :func:`gem.metrics.oracle_quality`.

Command line::

    gem oracle-eval [RECIPE] [--set KEY.PATH=VALUE ...] [--out DIR] [--n-images N] [--debug]

Output folder: ``oracle_eval.json`` (every number below), ``oracle_scores.csv`` (scores and
labels of every image), ``oracle_accuracy.png``, ``recipe.yaml`` and ``report.html`` /
``report.md``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from gem.io import atomic_save_figure, atomic_write_text, write_json
from gem.metrics import oracle_quality
from gem.plugins import Registry
from gem.recipe import Recipe

__all__ = ["evaluate_oracle", "format_oracle_table", "plot_oracle_quality", "oracle_main"]

#: Names of the files an evaluation writes into its folder.
RESULT_FILE = "oracle_eval.json"
SCORES_FILE = "oracle_scores.csv"
FIGURE_FILE = "oracle_accuracy.png"


def evaluate_oracle(recipe: Recipe, registry: Registry, out_dir: Path, n_images: Optional[int] = None,
                    accelerator: Any = None, show_progress: bool = True) -> dict[str, Any]:
    """Score the first images of the recipe's data set with its oracle and compare with the labels.

    Parameters
    ----------
    recipe : a validated recipe (:func:`gem.recipe.validate_recipe`); its ``dataset`` and
        ``oracle`` sections are used, ``scoring.batch_size`` and ``scoring.cache`` say how the
        oracle is asked, ``training.cpu`` / ``training.threads`` where it runs.
    registry : the plugin registry the recipe was validated with.
    out_dir : folder for the results (created).
    n_images : how many images, from the first one on (default ``recipe.scoring.n_images``;
        at most the whole data set). Unlike a run, no images are held out and sample weights
        are ignored: the oracle is compared with the labels on images 0 .. n-1.
    accelerator : an ``accelerate.Accelerator``; by default one is made as a run makes it
        (oracles such as ``llava`` take their device from it).
    show_progress : show a progress bar while scoring.

    Returns
    -------
    dict
        What :func:`gem.metrics.oracle_quality` returns (``accuracy``, ``accuracy_mean``,
        ``missing_rate``, ``missing_rate_overall``, ``all_zero_rate``, ``all_missing_rate``,
        ``binary``, ``n_images``), plus ``recipe``, ``dataset``, ``oracle`` (plugin names),
        ``cache_key``, ``cache`` (the cache file or None), ``attributes``, ``counters``
        (``cache_hits`` and ``images_asked`` from :func:`gem.pipeline.score_images`, then the
        oracle's own ``stats()``: requests, retries, tokens ...), ``seconds`` and ``out_dir``.
        The same is written to ``oracle_eval.json``.

    Raises
    ------
    gem.pipeline.DataError
        When the data set has no labels to compare with (checked before the oracle is built,
        so no request is paid for), or no images.
    """
    import torch
    import yaml
    from accelerate import Accelerator

    from gem.interfaces import BuildContext
    from gem.pipeline import DataError, load_dataset, score_with_cache

    started = time.perf_counter()
    out_dir = Path(out_dir)
    pm = registry.pm
    pm.hook.gem_configure.call_historic(kwargs={"recipe": recipe.to_dict()})
    topts = recipe.training
    if topts.threads:
        torch.set_num_threads(topts.threads)
    acc = accelerator or Accelerator(cpu=topts.cpu, mixed_precision=topts.mixed_precision)
    main = acc.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    context = BuildContext(seed=recipe.seed, run_dir=out_dir, cache_dir=Path(recipe.cache_dir), accelerator=acc)
    context.cache_dir.mkdir(parents=True, exist_ok=True)
    dataset_name, oracle_name = recipe.plugin_name("dataset"), recipe.plugin_name("oracle")

    def build(stage: str) -> Any:
        return registry.get(stage, recipe.plugin_name(stage)).build(recipe.plugin_options[stage], context)

    # 1. Data, and the labels to compare with (before the oracle: no request is paid for in vain).
    dataset = load_dataset(build, recipe, acc)
    attributes = list(dataset.attributes)
    if dataset.attribute_scores is None:
        raise DataError(
            f"data set {dataset_name!r} has no attribute labels, so there is nothing to compare the oracle "
            f"with; evaluate the oracle on a data set with labels (synthetic, celeba, shapes3d, dsprites, "
            f"or image_folder with attributes_csv)")
    labels_all = np.asarray(dataset.attribute_scores)
    if labels_all.shape != (len(dataset), len(attributes)):
        raise DataError(f"data set {dataset_name!r}: attribute labels have shape {labels_all.shape}, "
                        f"expected {(len(dataset), len(attributes))} (images, attributes)")
    n = recipe.scoring.n_images if n_images is None else int(n_images)
    if n < 1:
        raise ValueError(f"the number of images to score must be at least 1, got {n}")
    n = min(n, len(dataset))
    indices = np.arange(n)
    context.dataset, context.attributes = dataset, attributes
    pm.hook.gem_on_stage_end(stage="data", outputs={"dataset": dataset})

    # 2. Oracle scores, through the score cache a run uses.
    oracle = build("oracle")
    cache_key = getattr(oracle, "cache_key", "") or ""
    scores, counters = score_with_cache(oracle, dataset, indices, recipe, show_progress=show_progress and main)
    pm.hook.gem_on_stage_end(stage="scores", outputs={"scores": scores, "indices": indices})

    # 3. Compare with the labels.
    labels = labels_all[indices]
    quality = oracle_quality(scores, labels, attributes)
    result: dict[str, Any] = {
        "recipe": recipe.name,
        "dataset": dataset_name,
        "oracle": oracle_name,
        "cache_key": cache_key,
        "cache": str(context.cache_dir / "oracle_scores.sqlite") if recipe.scoring.cache and cache_key else None,
        "attributes": attributes,
        **quality,
        "counters": counters,
        "seconds": time.perf_counter() - started,
        "out_dir": str(out_dir),
    }
    if main:
        _write_scores(out_dir / SCORES_FILE, indices, attributes, scores, labels)
        plot_oracle_quality(quality, out_dir / FIGURE_FILE,
                            f"oracle {oracle_name!r} vs labels of {dataset_name!r}")
        write_json(out_dir / RESULT_FILE, result)
        _write_report(out_dir, result)
    acc.wait_for_everyone()
    return result


# --------------------------------------------------------------------------- outputs


def _write_scores(path: Path, indices: np.ndarray, attributes: Sequence[str], scores: np.ndarray,
                  labels: np.ndarray) -> None:
    """One row per image: the oracle's score of each attribute (empty = missing), then each label."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", *attributes, *(f"{a} (label)" for a in attributes)])
    for index, row, truth in zip(indices, scores, labels):
        writer.writerow([int(index), *("" if np.isnan(v) else f"{v:g}" for v in row), *(int(v) for v in truth)])
    atomic_write_text(path, buf.getvalue())


def _nan_to_zero(values: Sequence[float]) -> np.ndarray:
    return np.nan_to_num(np.asarray(values, dtype=float), nan=0.0)


def _percent(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.0f}%"


def plot_oracle_quality(quality: dict[str, Any], path: Path, title: str) -> Path:
    """Bar chart of an :func:`gem.metrics.oracle_quality` result.

    Left: accuracy and missing rate of each attribute (binary attributes are marked ``(0/1)``);
    a dashed mark shows the accuracy of a uniformly random answer (1/6, or 1/2 for 0/1 labels).
    Right: the overall rates -- mean accuracy, missing answers, images whose every answer is 0
    (the paper's "meaningless" answers) and images without any answer. An attribute without
    a single answer has no accuracy; its bar is empty and labelled n/a.

    Parameters
    ----------
    quality : the dict :func:`gem.metrics.oracle_quality` returns.
    path : output image (PNG).
    title : figure title (the number of images is appended).

    Returns
    -------
    Path
        ``path``.
    """
    from matplotlib.figure import Figure

    names = list(quality["accuracy"])
    binary = quality.get("binary", {})
    labels = [f"{a}\n(0/1)" if binary.get(a) else a for a in names]
    accuracy = [quality["accuracy"][a] for a in names]
    missing = [quality["missing_rate"][a] for a in names]
    overall_names = ["mean\naccuracy", "missing\nanswers", "all-zero\nimages", "no-answer\nimages"]
    overall = [quality["accuracy_mean"], quality["missing_rate_overall"], quality["all_zero_rate"],
               quality["all_missing_rate"]]

    n = len(names)
    fig = Figure(figsize=(max(5.0, 1.2 + 0.85 * n) + 3.2, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(n, 2), 2.6]})
    x = np.arange(n)
    width = 0.4
    bars_acc = left.bar(x - width / 2, _nan_to_zero(accuracy), width, color="C0", label="accuracy")
    bars_mis = left.bar(x + width / 2, _nan_to_zero(missing), width, color="#9e9e9e", label="missing rate")
    for bars, values in ((bars_acc, accuracy), (bars_mis, missing)):
        left.bar_label(bars, labels=[_percent(v) for v in values], fontsize=7, padding=1)
    # A uniformly random answer is right 1/6 of the time on the 0-5 scale, 1/2 for a binary label.
    chance = [0.5 if binary.get(a) else 1 / 6 for a in names]
    left.hlines(chance, x - width, x, colors="black", linestyles="dashed", lw=1, label="random answer")
    left.set_xticks(x)
    left.set_xticklabels(labels, rotation=30 if n > 6 else 0, ha="right" if n > 6 else "center", fontsize=8)
    left.set_ylim(0, 1.12)
    left.set_ylabel("fraction of images")
    left.set_title("per attribute", fontsize=10)
    left.legend(loc="upper right", fontsize=8, ncols=3, frameon=False)
    left.grid(axis="y", alpha=0.3, lw=0.5)

    colours = ["C0", "#9e9e9e", "#d95f02", "#7570b3"]
    bars = right.bar(np.arange(4), _nan_to_zero(overall), 0.6, color=colours)
    right.bar_label(bars, labels=[_percent(v) for v in overall], fontsize=8, padding=1)
    right.set_xticks(np.arange(4))
    right.set_xticklabels(overall_names, fontsize=8)
    right.set_ylim(0, 1.12)
    right.set_title("overall", fontsize=10)
    right.grid(axis="y", alpha=0.3, lw=0.5)
    fig.suptitle(f"{title}  (N={quality.get('n_images', '?')})", fontsize=11)
    return atomic_save_figure(fig, path, dpi=120)


def _attribute_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"attribute": a, "labels": "binary (score >= 3 = present)" if result["binary"].get(a) else "0-5 (exact)",
             "accuracy": result["accuracy"][a], "missing rate": result["missing_rate"][a]}
            for a in result["accuracy"]]


def _write_report(out_dir: Path, result: dict[str, Any]) -> None:
    from gem.report import Report

    doc = Report(f"gem oracle evaluation: {result['oracle']} on {result['dataset']}")
    doc.add_table("Summary", {
        "oracle": result["oracle"], "data set": result["dataset"], "images": result["n_images"],
        "mean accuracy": result["accuracy_mean"], "missing answers": result["missing_rate_overall"],
        "all-zero images": result["all_zero_rate"], "images without any answer": result["all_missing_rate"],
        "cache key": result["cache_key"] or "(none: not cached)", "seconds": result["seconds"]})
    doc.add_text("How it is measured",
                 f"The oracle scored the first {result['n_images']} images of the data set, every attribute "
                 "on the 0-5 scale; missing answers are left out of the accuracy and counted in the missing "
                 "rate, never as 0. For an attribute with 0-5 labels a score is correct when it rounds to "
                 "the label; for a binary attribute (labels 0 and 5 only, as CelebA's) a score of 3 or more "
                 "means present. An all-zero image is one whose every given score is 0 (the paper's "
                 "meaningless answers, Sec. 4.4).")
    doc.add_image("Accuracy per attribute", out_dir / FIGURE_FILE)
    doc.add_table("Per attribute", _attribute_rows(result))
    doc.add_table("Requests and cache", result["counters"],
                  "cache_hits: image-attribute scores read from the cache; images_asked: images sent to the "
                  "oracle; the rest is the oracle's own stats().")
    doc.add_text("Files", f"{RESULT_FILE}: every number on this page. {SCORES_FILE}: the oracle's score "
                          "(empty = missing) and the label of every image and attribute. recipe.yaml: the "
                          "resolved recipe.")
    doc.write(out_dir)


def format_oracle_table(result: dict[str, Any]) -> str:
    """A plain-text table of an evaluation for the terminal: one line per attribute, then totals."""

    def cell(value: Any) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    names = list(result["accuracy"])
    width = max([len("attribute"), len("mean"), *(len(a) for a in names)])
    lines = [f"oracle {result.get('oracle', '?')!r} vs labels of {result.get('dataset', '?')!r} "
             f"on {result['n_images']} images",
             f"{'attribute'.ljust(width)}  accuracy  missing  labels"]
    for a in names:
        kind = "0/1" if result.get("binary", {}).get(a) else "0-5"
        lines.append(f"{a.ljust(width)}  {cell(result['accuracy'][a]):>8}  {cell(result['missing_rate'][a]):>7}  {kind}")
    lines.append(f"{'mean'.ljust(width)}  {cell(result['accuracy_mean']):>8}  {cell(result['missing_rate_overall']):>7}")
    lines.append(f"all-zero images: {cell(result['all_zero_rate'])}   images without any answer: "
                 f"{cell(result['all_missing_rate'])}")
    counters = result.get("counters", {})
    if counters:
        lines.append("counters: " + ", ".join(f"{k}={v}" for k, v in counters.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Score images with a recipe's relation oracle and compare the scores with the "
                               "data set's labels (accuracy per attribute, missing and all-zero answers).")
    parser.add_argument("recipe", nargs="?", help="path to a YAML recipe (default: the built-in synthetic recipe)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe key, e.g. --set oracle.error_rate=0.2 (repeatable)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: <recipe out>/<name>-oracle-<timestamp>)")
    parser.add_argument("--n-images", type=int, metavar="N", help="images to score, from the first (default: scoring.n_images)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _out_dir(recipe: Recipe, out: Optional[Path]) -> Path:
    if out is not None:
        return out
    base = Path(recipe.out) / f"{recipe.name}-oracle-{datetime.now():%Y%m%d-%H%M%S}"
    out, k = base, 1
    while out.exists():
        out, k = Path(f"{base}-{k}"), k + 1
    return out


def oracle_main(argv: Optional[Sequence[str]] = None, prog: str = "gem oracle-eval") -> int:
    """``gem oracle-eval [RECIPE] [--set KEY.PATH=VALUE ...] [--out DIR] [--n-images N] [--debug]``."""
    from gem.cli import _guard

    args = _parser(prog).parse_args(argv)
    return _guard(lambda: _oracle_eval(args), args.debug, prog)


def _oracle_eval(args: argparse.Namespace) -> int:
    from gem import __version__
    from gem.plugins import make_plugin_manager
    from gem.recipe import apply_overrides, load_recipe_file, validate_recipe

    data = load_recipe_file(args.recipe) if args.recipe else {}
    data = apply_overrides(data, args.overrides)
    registry = Registry(make_plugin_manager())
    recipe = validate_recipe(data, registry)
    if args.n_images is not None and args.n_images < 1:
        raise ValueError(f"--n-images must be at least 1, got {args.n_images}")
    out_dir = _out_dir(recipe, args.out)
    print(f"gem {__version__}: evaluating oracle {recipe.plugin_name('oracle')!r} on data set "
          f"{recipe.plugin_name('dataset')!r} into {out_dir}", file=sys.stderr)
    result = evaluate_oracle(recipe, registry, out_dir, n_images=args.n_images)
    print(format_oracle_table(result))
    print(f"report: {out_dir / 'report.html'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(oracle_main())

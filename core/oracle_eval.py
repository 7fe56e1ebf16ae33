"""How good is a relation oracle? Score images with it and compare with the data set's labels.

The GEM paper (Xie et al., NeurIPS 2024, Sec. 4.4, Figure 6) checks its MLLM oracle against
CelebA's attribute labels: the fraction of correct answers per attribute, and how often the
model gave no usable answer or a "meaningless" all-zero one. :func:`evaluate_oracle` does the
same for any recipe whose data set has labels (``ImageDataset.attribute_scores``): it builds the
recipe's data set and oracle exactly as a run does, scores the first ``n`` images through
:func:`gem.scoring.score_images` and the persistent score cache (so an evaluation and a run
share every paid-for answer), and compares with :func:`gem.metrics.oracle_quality`.

Command line::

    gem oracle-eval [RECIPE] [--set KEY.PATH=VALUE ...] [--out DIR] [--n-images N] [--debug]

Output folder: ``oracle_eval.json`` (every number below), ``oracle_scores.csv`` (scores and
labels of every image), ``oracle_accuracy.png``, ``recipe.yaml`` and ``report.html`` /
``report.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import yaml

from gem import __version__
from gem.cli_errors import guard
from gem.context import RunContext, timestamped_folder
from gem.errors import ConfigurationError, DataError
from gem.figures import plot_oracle_quality
from gem.io import atomic_write_text, write_json
from gem.metrics import oracle_quality
from gem.plugins import Registry, make_plugin_manager
from gem.recipe import Recipe, load_recipe_file, override_recipe, validate_recipe
from gem.report import Report, format_cell, text_table
from gem.run_folder import write_scores
from gem.scoring import score_with_cache, scoring_plan
from gem.progress import add_verbosity_options, logger, setup_from_args

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
        (``cache_hits`` and ``images_asked`` from :func:`gem.scoring.score_images`, then the
        oracle's own ``stats()``: requests, retries, tokens ...), ``seconds`` and ``out_dir``.
        The same is written to ``oracle_eval.json``.

    Raises
    ------
    gem.pipeline.DataError
        When the data set has no labels to compare with (checked before the oracle is built,
        so no request is paid for), or no images.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    pm = registry.pm
    context = RunContext.open(recipe, registry, out_dir, accelerator)
    acc = context.accelerator
    main = acc.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    dataset_name, oracle_name = recipe.plugin_name("dataset"), recipe.plugin_name("oracle")

    # 1. Data, and the labels to compare with (before the oracle: no request is paid for in vain).
    dataset = context.load_dataset()
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
        raise ConfigurationError(f"the number of images to score must be at least 1, got {n}")
    n = min(n, len(dataset))
    indices = np.arange(n)
    pm.hook.gem_on_stage_end(stage="data", outputs={"dataset": dataset})

    # 2. Oracle scores, through the score cache a run uses.
    oracle = context.build("oracle")
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
        "cache": str(Path(recipe.cache_dir) / "oracle_scores.sqlite") if recipe.scoring.cache and cache_key else None,
        "attributes": attributes,
        **quality,
        "counters": counters,
        "seconds": time.perf_counter() - started,
        "out_dir": str(out_dir),
    }
    if main:
        write_scores(out_dir / SCORES_FILE, indices, attributes, scores, labels)
        plot_oracle_quality(quality, out_dir / FIGURE_FILE,
                            f"oracle {oracle_name!r} vs labels of {dataset_name!r}")
        write_json(out_dir / RESULT_FILE, result)
        _write_report(out_dir, result)
    acc.wait_for_everyone()
    return result


# --------------------------------------------------------------------------- outputs


def _attribute_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"attribute": a, "labels": "binary (score >= 3 = present)" if result["binary"].get(a) else "0-5 (exact)",
             "accuracy": result["accuracy"][a], "missing rate": result["missing_rate"][a]}
            for a in result["accuracy"]]


def _write_report(out_dir: Path, result: dict[str, Any]) -> None:
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
    rows: list[list[Any]] = [[a, result["accuracy"][a], result["missing_rate"][a],
                              "2 levels (0 or 5)" if result.get("binary", {}).get(a) else "0-5"] for a in result["accuracy"]]
    rows.append(["mean", result["accuracy_mean"], result["missing_rate_overall"], ""])
    lines = [f"oracle {result.get('oracle', '?')!r} vs labels of {result.get('dataset', '?')!r} "
             f"on {result['n_images']} images",
             text_table(rows, header=["attribute", "accuracy", "missing", "labels"]),
             f"all-zero images: {format_cell(result['all_zero_rate'])}   images without any answer: "
             f"{format_cell(result['all_missing_rate'])}"]
    counters = result.get("counters", {})
    if counters:
        lines.append("counters: " + ", ".join(f"{k}={v}" for k, v in counters.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Score images with a recipe's relation oracle and compare the scores with the "
                               "data set's labels (accuracy per attribute, missing and all-zero answers).")
    parser.add_argument("recipe", nargs="?", help="a YAML recipe file or the name of a shipped recipe "
                                                  "(default: the built-in synthetic recipe)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe key, e.g. --set oracle.error_rate=0.2 (repeatable)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: <recipe out>/<name>-oracle-<timestamp>)")
    parser.add_argument("--n-images", type=int, metavar="N", help="images to score, from the first (default: scoring.n_images)")
    parser.add_argument("--dry-run", action="store_true",
                        help="say what scoring would ask (cached scores, requests, tokens, cost) and exit; sends nothing")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    add_verbosity_options(parser)
    return parser


def _out_dir(recipe: Recipe, out: Optional[Path]) -> Path:
    return out if out is not None else timestamped_folder(Path(recipe.out), f"{recipe.name}-oracle")


def oracle_main(argv: Optional[Sequence[str]] = None, prog: str = "gem oracle-eval") -> int:
    """``gem oracle-eval [RECIPE] [--set KEY.PATH=VALUE ...] [--out DIR] [--n-images N] [--debug]``."""
    args = _parser(prog).parse_args(argv)
    setup_from_args(args)
    return guard(lambda: _oracle_eval(args), args.debug, prog)


def _oracle_eval(args: argparse.Namespace) -> int:
    data = load_recipe_file(args.recipe) if args.recipe else {}
    registry = Registry(make_plugin_manager())
    data, notes = override_recipe(data, args.overrides, registry)
    for note in notes:
        logger.warning(f"gem oracle-eval: {note}")
    recipe = validate_recipe(data, registry)
    if args.n_images is not None and args.n_images < 1:
        raise ConfigurationError(f"--n-images must be at least 1, got {args.n_images}")
    if args.dry_run:
        context = RunContext.open(recipe, registry, Path(recipe.out))
        dataset = context.load_dataset()
        n = min(recipe.scoring.n_images if args.n_images is None else args.n_images, len(dataset))
        print(scoring_plan(recipe, registry, dataset, np.arange(n)))
        print("dry run: nothing was sent and no results were written")
        return 0
    out_dir = _out_dir(recipe, args.out)
    logger.info(f"gem {__version__}: evaluating oracle {recipe.plugin_name('oracle')!r} on data set "
                f"{recipe.plugin_name('dataset')!r} into {out_dir}")
    result = evaluate_oracle(recipe, registry, out_dir, n_images=args.n_images)
    print(format_oracle_table(result))
    print(f"report: {out_dir / 'report.html'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(oracle_main())

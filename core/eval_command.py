"""``gem eval RUN_DIR``: evaluate a finished run folder with everything its data set's ground truth
allows (:func:`gem.evaluation.evaluate_run`), print the numbers and rebuild the report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from gem.cli_errors import guard
from gem.disentanglement import METRICS as DIS_METRICS
from gem.errors import ConfigurationError
from gem.evaluation import GROUPS, EvalSettings, evaluate_run, select_metrics
from gem.report import text_table
from gem.progress import add_verbosity_options, setup_from_args

__all__ = ["format_eval_table", "eval_main"]

#: Entries of a metrics section that are descriptions or per-item detail, not table rows.
_NOT_ROWS = ("evaluation", "notes", "compared", "measured", "binary")


def _rows(prefix: str, values: dict[str, Any], out: list[tuple[str, Any]]) -> None:
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key in _NOT_ROWS or isinstance(value, np.ndarray) or (isinstance(value, (list, tuple)) and len(value) > 4):
            continue
        if isinstance(value, dict):
            _rows(name, value, out)
        else:
            out.append((name, value))


def format_eval_table(result: dict[str, Any]) -> str:
    """A plain-text table of an evaluation result (section, metric, value), then timings and notes."""
    rows: list[list[Any]] = []
    for section in GROUPS:
        if section in result:
            flat: list[tuple[str, Any]] = []
            _rows("", result[section], flat)
            rows += [[section if i == 0 else "", key, value] for i, (key, value) in enumerate(flat)]
    lines = [text_table(rows, header=["section", "metric", "value"])] if rows else []
    seconds = result.get("seconds") or {}
    if seconds:
        lines += ["", "time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())]
    lines += [f"note: {note}" for note in result.get("notes") or []]
    return "\n".join(lines)


def _eval_parser(prog: str = "gem eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Evaluate a finished run folder (everything its data "
                                     "set's ground truth allows) and add the results to its metrics.json and report.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder written by gem-run")
    parser.add_argument("--metrics", action="append", default=None, metavar="NAME[,NAME...]",
                        help="groups (" + ", ".join(GROUPS) + ") or disentanglement metrics (" +
                             ", ".join(DIS_METRICS) + "); default: everything")
    parser.add_argument("--n-train", type=int, default=10000, help="disentanglement training points (10000)")
    parser.add_argument("--n-test", type=int, default=5000, help="disentanglement test points (5000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (0)")
    parser.add_argument("--feature-extractor", default=None, metavar="SPEC",
                        help="FID/KID features: 'package.module:attr', a TorchScript file, or 'inception' "
                             "(default: Inception-v3 when torch-fidelity is installed)")
    parser.add_argument("--fid-images", type=int, default=None, help="held-out images for FID/KID (default: all)")
    parser.add_argument("--dci-trees", type=int, default=100, help="boosting stages per DCI classifier (100)")
    parser.add_argument("--dci-n-train", type=int, default=None, help="DCI alone on a smaller split (default: --n-train)")
    parser.add_argument("--dci-n-test", type=int, default=None, help="DCI alone on a smaller split (default: --n-test)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    add_verbosity_options(parser)
    return parser


def eval_main(argv: Optional[Sequence[str]] = None, prog: str = "gem eval") -> int:
    """``gem eval RUN_DIR [--metrics ...] [--n-train N] [--n-test N] [--seed S] [--feature-extractor SPEC]``."""
    args = _eval_parser(prog).parse_args(argv)
    setup_from_args(args)

    def action() -> int:
        try:  # the names alone, before the run folder is loaded
            select_metrics(args.metrics)
        except ValueError as exc:
            raise ConfigurationError(f"--metrics: {exc}") from None
        settings = EvalSettings(n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                                feature_extractor=args.feature_extractor, fid_images=args.fid_images,
                                dci_trees=args.dci_trees, dci_n_train=args.dci_n_train, dci_n_test=args.dci_n_test)
        result = evaluate_run(args.run_dir, args.metrics, settings=settings)
        print(format_eval_table(result))
        print(f"report: {Path(result['run_dir']) / 'report.html'}")
        return 0

    return guard(action, args.debug, prog)

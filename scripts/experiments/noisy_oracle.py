"""Does the graph learner refine an imperfect S?  (issue "Does relation-awareness help?", part 3)

Trains GEM on the default synthetic recipe with the ``labels`` oracle at several error rates and
numbers of scored images, for several seeds and graph learners, and tabulates

* |S - true|: ``relations.oracle_vs_true.mae`` (the oracle's impact matrix against the truth);
* |A - true|: ``relations.learned_vs_true.mae`` (the trained graph against the truth), per learner.

A learner ``calibrated:auto`` (options after the colon, comma-separated, e.g.
``calibrated:auto,refine=true``) gets ``graph.validity`` measured here: the recipe's own oracle
scores the last ``--calibration`` images of the data set (held out from training and scoring), and
the validity is the mean over attributes of Spearman's ρ between those scores and the labels
(``gem_plugins.graph_learners.oracle_validity``), kept in ``<out>/validity.json``. The table also
shows ``calibrated (from S)``: the untrained calibrated graph computed from each finished run's S
with that validity (what ``calibrated`` without ``refine`` trains to, since it is not trained).

The ``fixed`` learner is A = S (clipped to [-1, 1], which Somers' D never leaves), so its
|A - true| *is* |S - true| of the same seed and setting; it is read from S and not trained unless
``--train-fixed`` is given.

Runs go to ``<out>/<learner>/e<error>_n<images>_s<seed>``; a run whose ``metrics.json`` exists and
whose ``recipe.yaml`` is the recipe this script would run is reused, so the script can be stopped
and started again (one run at a time, one thread).  Only the ``relations`` metric group is
evaluated.

    OMP_NUM_THREADS=1 /work/venv/bin/python scripts/experiments/noisy_oracle.py \
        --learners gcn --seeds 0 1 2 --out runs/noisy-oracle --table docs/results/noisy-oracle-table.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import yaml  # noqa: E402

#: Extra recipe overrides per learner name used in the table (a learner name may carry options).
LEARNERS = {
    "gcn": ["graph.plugin=gcn"],
    "fixed": ["graph.plugin=fixed"],
}


def learner_overrides(name: str) -> list[str]:
    """``gcn`` / ``fixed`` / any registered graph plugin, or ``plugin:key=value,key=value``."""
    if name in LEARNERS:
        return list(LEARNERS[name])
    plugin, _, options = name.partition(":")
    out = [f"graph.plugin={plugin}"]
    for item in filter(None, options.split(",")):
        out.append(f"graph.{item}")
    return out


def measure_validity(error: float, seed: int, args: argparse.Namespace) -> float:
    """Pooled validity of the recipe's oracle on the last ``args.calibration`` images (cached)."""
    import numpy as np

    from gem.context import RunContext
    from gem_plugins.graph_learners import oracle_validity

    path = args.out / "validity.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    key = f"e{error:g}_s{seed}_c{args.calibration}"
    if key not in known:
        recipe, registry = recipe_for(error, 300, seed, "gcn", args)
        ctx = RunContext.open(recipe, registry, args.out / "calibration")
        dataset = ctx.load_dataset()
        oracle = ctx.build("oracle")
        idx = np.arange(len(dataset.images) - args.calibration, len(dataset.images))
        scores = oracle.score(np.asarray(dataset.images[idx]), idx, list(dataset.attributes))
        per_attribute = oracle_validity(scores, dataset.attribute_scores[idx])
        known[key] = {"pooled": float(np.nanmean(per_attribute)), "per_attribute": per_attribute.tolist()}
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=2))
    return known[key]["pooled"]


def recipe_for(error: float, n_images: int, seed: int, learner: str, args: argparse.Namespace):
    from gem.plugins import Registry, make_plugin_manager
    from gem.recipe import DEFAULT_RECIPE, apply_overrides, validate_recipe

    if "auto" in learner.partition(":")[2].split(","):
        validity = measure_validity(error, seed, args)
        learner = learner.replace("auto", f"validity=[{min(validity, 1.0):.4f}]")
    overrides = [
        f"seed={seed}",
        f"oracle.error_rate={error}",
        f"scoring.n_images={n_images}",
        f"training.steps={args.steps}",
        f"training.warmup_steps={args.warmup}",
        "training.threads=1",
        "evaluation.full_metrics=false",
        f"cache_dir={args.cache_dir}",
        *learner_overrides(learner),
        *args.set,
    ]
    graph = dict(DEFAULT_RECIPE.get("graph") or {})
    data = dict(DEFAULT_RECIPE)
    if not learner.startswith("gcn"):  # the default recipe's gcn keys do not apply to other learners
        data["graph"] = {"plugin": graph.get("plugin")}
    registry = Registry(make_plugin_manager())
    return validate_recipe(apply_overrides(data, overrides), registry), registry


def run_dir_for(out: Path, learner: str, error: float, n_images: int, seed: int) -> Path:
    safe = learner.replace(":", "_").replace(",", "_").replace("=", "")
    return out / safe / f"e{error:g}_n{n_images}_s{seed}"


def finished(run_dir: Path, recipe, registry) -> bool:
    """Whether ``run_dir`` holds a finished run of ``recipe``: its stored recipe, validated with
    today's code (so a key added since with its default fills in), resolves to the same recipe."""
    from gem.recipe import RecipeError, validate_recipe

    metrics, stored = run_dir / "metrics.json", run_dir / "recipe.yaml"
    if not (metrics.is_file() and stored.is_file()):
        return False
    try:
        then = validate_recipe(yaml.safe_load(stored.read_text()), registry)
    except (RecipeError, ValueError):
        return False
    return json.loads(json.dumps(then.to_dict())) == json.loads(json.dumps(recipe.to_dict()))


def run_one(run_dir: Path, recipe, registry) -> None:
    from gem.pipeline import run_recipe

    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale or different run: start over
    run_dir.mkdir(parents=True)
    run_recipe(recipe, registry, run_dir, eval_metrics=["relations"])


def read(run_dir: Path, error: float, seed: int, args: argparse.Namespace) -> dict:
    rel = json.loads((run_dir / "metrics.json").read_text())["relations"]
    out = {"S": rel["oracle_vs_true"]["mae"], "A": rel["learned_vs_true"]["mae"]}
    if not args.no_offline:  # the untrained calibrated graph from this run's S
        import numpy as np
        import torch

        from gem_plugins.graph_learners import CalibratedGraphOptions, disattenuate

        impact = json.loads((run_dir / "impact.json").read_text())
        S, T = np.asarray(impact["oracle_impact"]), np.asarray(impact["true_impact"])
        validity = min(measure_validity(error, seed, args), 1.0)
        A = disattenuate(torch.as_tensor(S), [validity], CalibratedGraphOptions().floor).numpy()
        off = ~np.eye(len(S), dtype=bool)
        out["calibrated_from_S"] = float(np.abs(A - T)[off].mean())
    return out


def mean_spread(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4f} (1 seed)"
    return f"{mean:.4f} ± {(max(values) - min(values)) / 2:.4f}"


def table(results: dict, args: argparse.Namespace) -> str:
    learners = [name for name in args.learners]
    head = ["error_rate", "n_images", "seeds", "|S − true|"] + [f"|A − true| {name}" for name in learners]
    if "fixed" not in learners:
        head.insert(4, "|A − true| fixed (= S)")
    if not args.no_offline:
        head.append("|A − true| calibrated (from S)")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for error, n_images in itertools.product(args.errors, args.images):
        s_by_seed, offline, cols = {}, {}, {name: [] for name in learners}
        for seed in args.seeds:
            for name in learners:
                r = results.get((error, n_images, seed, name))
                if r is not None:
                    s_by_seed.setdefault(seed, r["S"])  # S of the first learner listed (see the notes on the cache)
                    if "calibrated_from_S" in r:
                        offline.setdefault(seed, r["calibrated_from_S"])
                    cols[name].append(r["A"])
        s_values, seeds = list(s_by_seed.values()), set(s_by_seed)
        row = [f"{error:g}", str(n_images), ",".join(map(str, sorted(seeds))) or "–", mean_spread(s_values)]
        if "fixed" not in learners:
            row.append(mean_spread(s_values))
        row += [mean_spread(cols[name]) for name in learners]
        if not args.no_offline:
            row.append(mean_spread(list(offline.values())))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "mean ± half the range over the seeds listed; MAE over the 30 off-diagonal edges.", "",
              "Paired: |A − true| − |S − true| of the same run (negative: A is closer to the truth than S).", ""]
    head = ["error_rate", "n_images"] + [f"{name}: A − S" for name in learners]
    if not args.no_offline:
        head.append("calibrated (from S): A − S")
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for error, n_images in itertools.product(args.errors, args.images):
        row = [f"{error:g}", str(n_images)]
        for name in learners:
            diffs = [results[(error, n_images, seed, name)]["A"] - results[(error, n_images, seed, name)]["S"]
                     for seed in args.seeds if (error, n_images, seed, name) in results]
            row.append(mean_spread(diffs).replace(" (1 seed)", "") + (f" ({len(diffs)})" if diffs else ""))
        if not args.no_offline:
            diffs = {}
            for seed in args.seeds:
                for name in learners:
                    r = results.get((error, n_images, seed, name))
                    if r is not None and "calibrated_from_S" in r:
                        diffs.setdefault(seed, r["calibrated_from_S"] - r["S"])
            row.append(mean_spread(list(diffs.values())).replace(" (1 seed)", "") + (f" ({len(diffs)})" if diffs else ""))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--errors", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--images", type=int, nargs="+", default=[300, 1500])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--learners", nargs="+", default=["gcn"],
                        help="graph learners: a plugin name, or plugin:key=value,key=value for options")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=600)
    parser.add_argument("--set", action="append", default=[], help="further recipe overrides key.path=value")
    parser.add_argument("--out", type=Path, default=Path("runs/noisy-oracle"))
    parser.add_argument("--cache-dir", default=".cache/gem")
    parser.add_argument("--calibration", type=int, default=300, help="labelled images for calibrated:auto")
    parser.add_argument("--no-offline", action="store_true", help="leave out the calibrated (from S) column")
    parser.add_argument("--table", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("--no-train", action="store_true", help="only tabulate the finished runs")
    parser.add_argument("--train-fixed", action="store_true", help="train the fixed learner too (A = S anyway)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    results: dict = {}
    for seed, error, n_images, name in itertools.product(args.seeds, args.errors, args.images, args.learners):
        recipe, registry = recipe_for(error, n_images, seed, name, args)
        run_dir = run_dir_for(args.out, name, error, n_images, seed)
        if name == "fixed" and not args.train_fixed and not finished(run_dir, recipe, registry):
            continue  # filled from S below
        if not finished(run_dir, recipe, registry):
            if args.no_train:
                continue
            started = time.perf_counter()
            print(f"[noisy-oracle] training {run_dir}", file=sys.stderr, flush=True)
            run_one(run_dir, recipe, registry)
            print(f"[noisy-oracle] {run_dir} done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        results[(error, n_images, seed, name)] = read(run_dir, error, seed, args)
        print(json.dumps({"error": error, "n_images": n_images, "seed": seed, "learner": name,
                          **results[(error, n_images, seed, name)]}), flush=True)
    if "fixed" in args.learners:  # A = S: the fixed learner's error is the oracle's
        for (error, n_images, seed, name), r in list(results.items()):
            results.setdefault((error, n_images, seed, "fixed"), {**r, "A": r["S"]})
    text = table(results, args)
    print(text)
    if args.table is not None:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

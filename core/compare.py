"""``gem compare``: train several methods on the same data and seeds, evaluate them alike, and
write one table (mean ± std over seeds) with plots.

A *variant* is a named set of recipe sections applied on top of a base recipe: the baselines
swap the extractor (and use the ``identity`` graph, as published), the GEM ablations of the
paper's Section 4.5 change GEM's own settings. Every run is an ordinary ``gem-run`` in its own
process, so a crash in one method is recorded and the others go on; a finished run is reused when
the command is repeated with the same output folder and that run's recipe has not changed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import yaml

from gem.cli_errors import guard
from gem.figures import plot_comparison, plot_sweep
from gem.io import atomic_write_text, write_json
from gem.plugins import PluginError, Registry, make_plugin_manager
from gem.recipe import DEFAULT_RECIPE, RecipeError, apply_overrides, load_recipe_file, override_recipe, validate_recipe
from gem.run_report import FACTOR_SET_MEANINGS, codes_sentence
from gem.progress import add_verbosity_options, logger, progress, setup_from_args


@dataclass(frozen=True)
class Variant:
    """Recipe sections that turn the base recipe into one method.

    ``sections`` maps a stage to its keys. When the stage's plugin changes, the new section keeps
    only the base's architecture and optimiser keys (:data:`SHARED_EXTRACTOR_KEYS`), so every method
    trains the same networks at the same learning rate but keeps its own paper defaults.
    ``dynamic`` computes further ``key.path`` overrides from the base recipe (e.g. a schedule
    length tied to the number of training steps).
    """

    description: str
    sections: dict[str, dict[str, Any]]
    dynamic: Optional[Callable[[dict], dict[str, Any]]] = None

    def recipe(self, base: dict) -> dict:
        data = copy.deepcopy(base)
        for stage, keys in self.sections.items():
            current = dict(data.get(stage) or {})
            plugin = keys.get("plugin", current.get("plugin"))
            if plugin != current.get("plugin"):
                shared = SHARED_EXTRACTOR_KEYS if stage == "extractor" else ()
                current = {k: v for k, v in current.items() if k in shared}
            data[stage] = {**current, **keys, "plugin": plugin}
        if self.dynamic is not None:
            data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in self.dynamic(data).items()])
        return data


#: Extractor keys every method inherits from the base recipe when the plugin changes.
SHARED_EXTRACTOR_KEYS = ("lr", "image_size", "channels", "hidden", "distribution")

_FLAT = {"graph": {"plugin": "identity"}}


def _flat(plugin: str, description: str, **keys: Any) -> Variant:
    return Variant(description, {"extractor": {"plugin": plugin, **keys}, **_FLAT})


def _steps(recipe: dict) -> int:
    return int((recipe.get("training") or {}).get("steps", 4000))


def _capacity_over_run(recipe: dict) -> dict[str, Any]:
    return {"extractor.capacity_steps": _steps(recipe)}


def _joint_capacity_over_run(recipe: dict) -> dict[str, Any]:
    return {"extractor.capacity_z_steps": _steps(recipe), "extractor.capacity_c_steps": _steps(recipe)}


#: A U-Net small enough for a CPU comparison (the plugins' defaults are GPU-sized).
CPU_UNET = {"unet_channels": 8, "unet_mults": [1, 2, 2], "unet_blocks": 1}


#: Built-in variants, in table order.
VARIANTS: dict[str, Variant] = {
    "vae": _flat("vae", "VAE (Kingma & Welling 2014)"),
    "beta_vae": _flat("beta_vae", "β-VAE, β = 4 (Higgins et al. 2017)"),
    "annealed_vae": Variant("annealed-capacity β-VAE, γ = 1000, C: 0 → 25 nats over the run (Burgess et al. 2018)",
                            {"extractor": {"plugin": "annealed_vae"}, **_FLAT}, _capacity_over_run),
    "beta_tcvae": _flat("beta_tcvae", "β-TCVAE, β = 6, stratified sampling (Chen et al. 2018)"),
    "factor_vae": _flat("factor_vae", "FactorVAE, γ = 10 (Kim & Mnih 2018)"),
    "dip_vae_i": _flat("dip_vae_i", "DIP-VAE-I, λ_od = 10, λ_d = 100 (Kumar et al. 2018)"),
    "dip_vae_ii": _flat("dip_vae_ii", "DIP-VAE-II, λ_od = λ_d = 10 (Kumar et al. 2018)"),
    "joint_vae": Variant("JointVAE, γ = 150, C_z: 0 → 40 nats and C_c: 0 → 1.1 nats over the run, one 3-way "
                         "categorical (Dupont 2018)", {"extractor": {"plugin": "joint_vae"}, **_FLAT},
                         _joint_capacity_over_run),
    "rf_vae": _flat("rf_vae", "RF-VAE, γ = η = 6.4, λ(r) from 10 to 0.1 (Kim et al. 2019)"),
    "ivae": _flat("ivae", "iVAE, prior variance from the labels u (Khemakhem et al. 2020); uses labels"),
    "ivae_ddpm": _flat("ivae_ddpm", "iVAE + DDPM, λ_rec = 0.1, λ_KL = 5e-4, CPU-sized U-Net (Kühne & Zemann 2023/24); uses labels",
                       **CPU_UNET),
    "dear": _flat("dear", "DEAR, linear SCM prior, λ_sup = 5, its own learning rates (Shen et al. 2022); uses labels",
                  lr=5e-5),
    "infogan": _flat("infogan", "InfoGAN, λ = 1, its own learning rates (Chen et al. 2016)", lr=1e-3),
    "disdiff": _flat("disdiff", "DisDiff, reduced: trained from scratch in pixel space, CPU-sized U-Net "
                     "(Yang et al. 2023)", **CPU_UNET),
    "gem": Variant("GEM: β-VAE + GCN graph learner + adversarial term", {"extractor": {"plugin": "gem_vae"}}),
    "gem_single": Variant("GEM (Single): initial relations A = S only, no graph learner, no adversarial term",
                          {"extractor": {"plugin": "gem_vae", "adversarial": False}, "graph": {"plugin": "fixed"}}),
    "gem_no_graph_learner": Variant("GEM without the graph learner: A = S fixed, adversarial term kept",
                                    {"extractor": {"plugin": "gem_vae"}, "graph": {"plugin": "fixed"}}),
    "gem_no_adversarial": Variant("GEM without the adversarial term",
                                  {"extractor": {"plugin": "gem_vae", "adversarial": False}}),
    "gem_plain_vae": Variant("GEM with a plain VAE (β = 1) in place of the β-VAE",
                             {"extractor": {"plugin": "gem_vae", "beta": 1.0}}),
}

#: Methods ``gem compare`` runs unless ``--methods`` says otherwise: every variant but DisDiff, whose
#: 1 + n U-Net passes per step make it too slow for a CPU (run it with ``--methods disdiff``).
DEFAULT_METHODS: list[str] = [name for name in VARIANTS if name != "disdiff"]

#: What ``gem compare`` changes in the base recipe unless told otherwise: a run length that fits
#: every default method x 3 seeds of the default synthetic data into about an hour on a small CPU.
COMPARE_DEFAULTS = {"training": {"steps": 2000, "warmup_steps": 600}}

#: Evaluation settings of each run (cheaper than ``gem eval``'s reference ones; see the README).
COMPARE_EVAL: dict[str, Any] = {"metrics": ["disentanglement", "reconstruction", "relations", "efficiency"],
                                "n_train": 5000, "n_test": 2500, "dci_n_train": 2000, "dci_n_test": 1000,
                                "dci_trees": 50, "n_boot": 50, "efficiency_steps": 10}

#: Table columns: (label, path in metrics.json with an optional ``*factor`` unit conversion,
#: better: +1 higher / -1 lower, format).
COLUMNS: list[tuple[str, str, int, str]] = [
    *[(f"{label} {code_label}", f"disentanglement.{code}.{key}", 1, "{:.3f}")
      for label, key in (("MCC", "spearman_mcc"), ("MIG", "mig"), ("DCI-D", "dci_disentanglement"),
                         ("FactorVAE", "factorvae_score"))
      for code, code_label in (("exogenous", "μ"), ("attribute", "Aᵀμ"))],
    ("PSNR dB", "reconstruction.psnr", 1, "{:.2f}"),
    ("|A−true| MAE", "relations.learned_vs_true.mae", -1, "{:.4f}"),
    ("|S−true| MAE", "relations.oracle_vs_true.mae", -1, "{:.4f}"),
    ("sign agr.", "relations.learned_vs_true.sign_agreement", 1, "{:.2f}"),
    ("ms/step", "efficiency.seconds_per_step_median*1000", -1, "{:.1f}"),
    ("train s", "training.seconds", -1, "{:.0f}"),
]


#: What the paired disentanglement columns are.
CODES_NOTE = ("Disentanglement columns come in pairs, μ and Aᵀμ (the same for the flat baselines, whose graph is "
              "the identity). " + codes_sentence())


def _lookup(metrics: dict, path: str) -> Any:
    """The value at a dotted path of metrics.json, None where the path is missing."""
    node: Any = metrics
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _get_text(metrics: dict, path: str) -> Optional[str]:
    value = _lookup(metrics, path)
    return value if isinstance(value, str) else None


def _get(metrics: dict, path: str) -> Optional[float]:
    path, _, factor = path.partition("*")
    node = _lookup(metrics, path)
    if not isinstance(node, (int, float)) or isinstance(node, bool) or not math.isfinite(node):
        return None
    return float(node) * (float(factor) if factor else 1.0)


@dataclass
class RunRecord:
    variant: str
    seed: int
    run_dir: Path
    status: str = "pending"
    seconds: float = 0.0
    error: str = ""
    metrics: dict = field(default_factory=dict)


def _drop_shared_keys_the_plugin_lacks(data: dict, variant: Variant, registry: Registry) -> None:
    """Inherited architecture keys a method has no option for (a GAN has no pixel ``distribution``)
    are left out rather than failing validation; keys the variant sets itself are kept."""
    extractor = data.get("extractor") or {}
    try:
        options = registry.get("extractor", extractor.get("plugin")).options
    except PluginError:
        return  # validation names the unknown plugin
    accepted = set(getattr(options, "__dataclass_fields__", {}))
    explicit = variant.sections.get("extractor", {})
    for key in SHARED_EXTRACTOR_KEYS:
        if key in extractor and key not in accepted and key not in explicit:
            del extractor[key]


def plan_runs(base: dict, methods: Sequence[str], seeds: Sequence[int], out: Path,
              variants: dict[str, Variant], registry: Registry) -> list[tuple[RunRecord, dict]]:
    """Resolve and validate every run's recipe before anything trains."""
    unknown = [m for m in methods if m not in variants]
    if unknown:
        raise RecipeError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(variants)}")
    plan = []
    for method in methods:
        for seed in seeds:
            data = variants[method].recipe(base)
            _drop_shared_keys_the_plugin_lacks(data, variants[method], registry)
            data.update(seed=int(seed), name=f"{method}-s{seed}", out=str(out / "runs"))
            try:
                validate_recipe(data, registry)
            except RecipeError as exc:
                raise RecipeError(f"method {method!r}: {exc}") from None
            plan.append((RunRecord(method, int(seed), out / "runs" / f"{method}-s{seed}"), data))
    return plan


def prepare_shared(base: dict, registry: Registry) -> None:
    """Make the data set cache and the oracle scores once, before runs start in parallel."""
    from gem.context import RunContext
    from gem.scoring import score_with_cache

    recipe = validate_recipe(base, registry)
    context = RunContext.open(recipe, registry, Path(recipe.out))
    dataset = context.load_dataset()
    if recipe.scoring.cache:
        score_with_cache(context.build("oracle"), dataset, context.split(dataset).scored, recipe, show_progress=True)


#: The command of a worker process. ``python -m`` would put the working directory first on
#: sys.path, where a folder named ``gem`` (a run folder of the method gem, a clone of this
#: repository) would shadow the installed package; the worker drops it before importing gem.
_WORKER = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
           "from gem.compare import _worker; sys.exit(_worker(*sys.argv[1:4]))")


def _run_one(record: RunRecord, recipe_path: Path, threads: int, eval_settings: dict) -> RunRecord:
    metrics_file = record.run_dir / "metrics.json"
    done_marker = record.run_dir / "compare_done.json"
    recipe = _comparable(yaml.safe_load(recipe_path.read_text()))
    if done_marker.exists() and metrics_file.exists():
        done = json.loads(done_marker.read_text())
        if done.get("recipe") == recipe:  # the same run; a changed recipe trains again
            record.status, record.metrics = "reused", json.loads(metrics_file.read_text())
            record.seconds = float(done.get("seconds", 0.0))
            return record
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    log_path = record.run_dir.parent.parent / "logs" / f"{record.run_dir.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-c", _WORKER, str(recipe_path), str(record.run_dir),
                               json.dumps(eval_settings)], stdout=log, stderr=subprocess.STDOUT, env=env)
    record.seconds = time.perf_counter() - started
    if proc.returncode != 0 or not metrics_file.exists():
        lines = log_path.read_text(errors="replace").strip().splitlines()
        record.status = "failed"
        record.error = f"exit {proc.returncode}: {lines[-1] if lines else 'no output'} (log: {log_path})"
        return record
    record.status, record.metrics = "done", json.loads(metrics_file.read_text())
    write_json(done_marker, {"seconds": record.seconds, "recipe": recipe})
    return record


def _comparable(recipe: dict) -> dict:
    """A run's recipe without what does not change its results (threads per process)."""
    recipe = copy.deepcopy(recipe)
    (recipe.get("training") or {}).pop("threads", None)
    return recipe


def _worker(recipe_path: str, run_dir: str, settings_json: str) -> int:
    """One run in its own process: ``gem-run`` with the compare evaluation at its end."""
    import torch

    from gem.evaluation import EvalSettings
    from gem.pipeline import run_recipe

    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    registry = Registry(make_plugin_manager())
    recipe = validate_recipe(load_recipe_file(recipe_path), registry)
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = json.loads(settings_json)
    metrics = settings.pop("metrics", None)
    run_recipe(recipe, registry, out, eval_metrics=metrics, eval_settings=EvalSettings(**settings))
    return 0


def summarise(records: Sequence[RunRecord], methods: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method: mean and sample std over its finished seeds for every column."""
    rows = []
    for method in methods:
        runs = [r for r in records if r.variant == method and r.status in ("done", "reused")]
        row: dict[str, Any] = {"method": method, "seeds": len(runs),
                               "failed": sum(r.variant == method and r.status == "failed" for r in records)}
        for label, path, _, _ in COLUMNS:
            values = [v for v in (_get(r.metrics, path) for r in runs) if v is not None]
            row[label] = {"mean": float(np.mean(values)) if values else None,
                          "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0 if values else None,
                          "values": values}
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table, mean ± std; the best mean of each column in bold."""
    best = {}
    for label, _, better, _ in COLUMNS:
        means = [r[label]["mean"] for r in rows if r[label]["mean"] is not None]
        if means and label not in ("train s",):
            best[label] = max(means) if better > 0 else min(means)
    header = ["method", "seeds", *[f"{label} {'↑' if better > 0 else '↓'}" for label, _, better, _ in COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["method"], str(r["seeds"]) + (f" ({r['failed']} failed)" if r["failed"] else "")]
        for label, _, _, fmt in COLUMNS:
            m, s = r[label]["mean"], r[label]["std"]
            if m is None:
                cells.append("—")
                continue
            text = fmt.format(m) + (" ± " + fmt.format(s) if r["seeds"] > 1 else "")
            cells.append(f"**{text}**" if best.get(label) == m else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, records: Sequence[RunRecord], methods: Sequence[str], variants: dict[str, Variant],
                  settings: dict[str, Any]) -> tuple[Path, str]:
    """table.md, table.csv, results.json, figures/comparison.png and report.md in ``out``."""
    rows = summarise(records, methods)
    table = format_table(rows)
    atomic_write_text(out / "table.md", table)
    csv_lines = ["method,seeds," + ",".join(f"{label} mean,{label} std" for label, *_ in COLUMNS)]
    for r in rows:
        cells = [r["method"], str(r["seeds"])]
        for label, *_ in COLUMNS:
            m, s = r[label]["mean"], r[label]["std"]
            cells += ["" if m is None else f"{m:.6g}", "" if s is None else f"{s:.6g}"]
        csv_lines.append(",".join(cells))
    atomic_write_text(out / "table.csv", "\n".join(csv_lines) + "\n")
    write_json(out / "results.json", {
        "settings": settings, "rows": rows,
        "runs": [{"method": r.variant, "seed": r.seed, "run_dir": str(r.run_dir), "status": r.status,
                  "seconds": r.seconds, "error": r.error} for r in records]})
    figure = plot_comparison(rows, COLUMNS, out / "figures" / "comparison.png")
    described = "\n".join(f"- **{m}**: {variants[m].description}" for m in methods)
    failures = "\n".join(f"- {r.variant} seed {r.seed}: {r.error}" for r in records if r.status == "failed")
    factor_sets = sorted({_get_text(r.metrics, "disentanglement.evaluation.factor_set") for r in records
                          if r.status in ("done", "reused")} - {None})
    report = (f"# gem compare\n\nBase recipe: `{settings.get('recipe') or 'built-in synthetic default'}`; "
              f"seeds {settings['seeds']}; training steps {settings['steps']}.\n\n## Methods\n\n{described}\n\n"
              f"## Results (mean ± std over seeds; best in bold)\n\n{table}\n![comparison]({figure.relative_to(out)})\n"
              f"\n{CODES_NOTE} Disentanglement was measured on {' and '.join(factor_sets) or 'no'} factors"
              + "".join(f"; {name}: {FACTOR_SET_MEANINGS[name]}" for name in factor_sets if name in FACTOR_SET_MEANINGS)
              + ".\n")
    if failures:
        report += f"\n## Failed runs\n\n{failures}\n"
    atomic_write_text(out / "report.md", report)
    return out / "table.md", table


def compare(base: dict, methods: Sequence[str], seeds: Sequence[int], out: Path, *, jobs: int = 1,
            threads: Optional[int] = None, variants: Optional[dict[str, Variant]] = None,
            eval_settings: Optional[dict] = None, recipe_name: str = "",
            log: Callable[[str], None] = print) -> list[RunRecord]:
    """Run every method with every seed and write the table; returns one record per run."""
    variants = variants or VARIANTS
    eval_settings = {**COMPARE_EVAL, **(eval_settings or {})}
    registry = Registry(make_plugin_manager())
    plan = plan_runs(base, methods, seeds, out, variants, registry)  # every error before any file is written
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 1) // max(jobs, 1))
    log(f"gem compare: {len(methods)} methods x {len(seeds)} seeds = {len(plan)} runs, "
        f"{jobs} at a time with {threads} thread(s) each, into {out}")
    prepare_shared(base, registry)
    recipes_dir = out / "recipes"
    recipes_dir.mkdir(exist_ok=True)
    jobs_args = []
    for record, data in plan:
        data.setdefault("training", {})["threads"] = threads
        path = recipes_dir / f"{record.run_dir.name}.yaml"
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
        jobs_args.append((record, path))
    records = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool, \
            progress(len(plan), "compare", unit="run") as bar:
        futures = [pool.submit(_run_one, record, path, threads, eval_settings) for record, path in jobs_args]
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            records.append(record)
            bar.update(1)
            bar.write(f"{record.variant} seed {record.seed}: {record.status} in {record.seconds:.0f} s"
                      + (f" — {record.error}" if record.error else ""))
    order = {(r.variant, r.seed): i for i, (r, _) in enumerate(plan)}
    records.sort(key=lambda r: order[(r.variant, r.seed)])
    steps = (base.get("training") or {}).get("steps")
    settings = {"recipe": recipe_name, "methods": list(methods), "seeds": list(seeds), "steps": steps,
                "jobs": jobs, "threads": threads, "evaluation": eval_settings}
    table_path, table = write_outputs(out, records, methods, variants, settings)
    log(table)
    log(f"table: {table_path}\nreport: {out / 'report.md'}")
    return records


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gem compare", description=(
        "Train several methods on the same data and seeds, evaluate them alike and write one table "
        "(mean ± std over seeds) with plots. Built-in methods: " + ", ".join(VARIANTS) + "."))
    p.add_argument("recipe", nargs="?", help="base recipe (default: the built-in synthetic recipe with "
                   f"{COMPARE_DEFAULTS['training']['steps']} training steps)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="NAME",
                   help="methods to run (default: all but disdiff, which is slow on a CPU)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="N", help="seeds (default: 0 1 2)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default: runs/compare)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of the base recipe (repeatable)")
    p.add_argument("--variant", action="append", nargs="+", default=[], metavar="NAME KEY.PATH=VALUE",
                   help="define a method: a name then overrides, e.g. --variant beta8 extractor.plugin=beta_vae "
                        "extractor.beta=8 graph.plugin=identity (repeatable; added to --methods)")
    p.add_argument("--relation-aware", action="store_true",
                   help="run the flat methods (baselines) with the base recipe's graph learner instead of the "
                        "identity graph, so every method decodes z_rel = A^T z")
    p.add_argument("--sweep", metavar="KEY.PATH=V1,V2,...",
                   help="run the comparison once per value of one recipe key (e.g. dataset.strength=0,0.4,0.7,0.9) "
                        "and plot every metric against it; each value gets its own folder under --out")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2; each gets cores/jobs threads)")
    p.add_argument("--threads", type=int, help="threads per run (default: cores / jobs)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate every run's recipe and print the runs that would train, then stop (writes nothing)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_verbosity_options(p)
    return p


#: Columns the sweep table and figure follow across the swept values.
SWEEP_COLUMNS = [c for c in COLUMNS if c[0].split()[0] in ("MCC", "MIG", "DCI-D") or c[0].startswith("|A")]


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """``"stage.key=v1,v2,..."`` -> (key, values as written)."""
    key, sep, values = spec.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or "." not in key or len(items) < 2:
        raise RecipeError(f"--sweep {spec!r}: write it as stage.key=value1,value2[,...] (at least two values)")
    return key.strip(), items


def plan_sweep(base: dict, key: str, values: Sequence[str], methods: Sequence[str], seeds: Sequence[int], out: Path,
               variants: dict[str, Variant]) -> dict[str, tuple[dict, list[tuple[RunRecord, dict]]]]:
    """Every swept value's base recipe and validated run plan (:func:`plan_runs`), before anything
    trains; an invalid value's error names it."""
    registry = Registry(make_plugin_manager())
    planned = {}
    for value in values:
        data = apply_overrides(base, [f"{key}={value}"])
        try:
            planned[value] = (data, plan_runs(data, methods, seeds, out / f"{key}={value}", variants, registry))
        except RecipeError as exc:
            raise RecipeError(f"--sweep {key}={value}: {exc}") from None
    for method in methods:  # a method whose recipe drops the key would repeat one run per value
        seen = {repr(_lookup(run_data, key)) for _, plan in planned.values()
                for record, run_data in plan if record.variant == method}
        if len(values) > 1 and len(seen) == 1:
            logger.warning(f"gem compare: --sweep {key}: method {method!r} does not take this value (its recipe "
                           f"keeps {next(iter(seen))} at every value), so its runs do not change along the sweep; "
                           f"define a method that sets the key itself with --variant")
    return planned


def sweep(base: dict, key: str, values: Sequence[str], methods: Sequence[str], seeds: Sequence[int], out: Path,
          **options: Any) -> dict[str, list[RunRecord]]:
    """:func:`compare` once per value of one recipe key, each into ``out/<key>=<value>`` (so finished
    runs are reused value by value), then ``sweep.md``, ``sweep.csv`` and ``figures/sweep.png``:
    every column of :data:`SWEEP_COLUMNS` against the value, one line per method, ± std over seeds."""
    planned = plan_sweep(base, key, values, methods, seeds, out, options.get("variants") or VARIANTS)
    records = {value: compare(data, methods, seeds, out / f"{key}={value}", **options)
               for value, (data, _) in planned.items()}
    rows = {value: summarise(recs, methods) for value, recs in records.items()}
    header = ["method", key, *(label for label, *_ in SWEEP_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_lines = [",".join(["method", key, *(f"{label} {stat}" for label, *_ in SWEEP_COLUMNS
                                            for stat in ("mean", "std"))])]
    for method in methods:
        for value in values:
            row = next(r for r in rows[value] if r["method"] == method)
            cells, numbers = [], []
            for label, _, _, fmt in SWEEP_COLUMNS:
                m, sd = row[label]["mean"], row[label]["std"]
                cells.append("—" if m is None else fmt.format(m) + (f" ± {fmt.format(sd)}" if row["seeds"] > 1 else ""))
                numbers += ["" if m is None else f"{m:.6g}", "" if sd is None else f"{sd:.6g}"]
            lines.append("| " + " | ".join([method, value, *cells]) + " |")
            csv_lines.append(",".join([method, value, *numbers]))
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "sweep.md", f"# gem compare --sweep {key}\n\nMean ± std over seeds {list(seeds)}. "
                                        f"{CODES_NOTE}\n\n{table}\n![sweep](figures/sweep.png)\n")
    atomic_write_text(out / "sweep.csv", "\n".join(csv_lines) + "\n")
    plot_sweep(key, list(values), rows, SWEEP_COLUMNS, out / "figures" / "sweep.png")
    return records


def print_plan(base: dict, methods: Sequence[str], seeds: Sequence[int], out: Path, variants: dict[str, Variant],
               swept: Optional[tuple[str, list[str]]] = None, log: Callable[[str], None] = print) -> int:
    """Validate every run of a comparison (or of each swept value) and print one line per run;
    returns the number of runs. Nothing is written."""
    if swept:
        plans = [plan for _, plan in plan_sweep(base, *swept, methods, seeds, out, variants).values()]
    else:
        plans = [plan_runs(base, methods, seeds, out, variants, Registry(make_plugin_manager()))]
    count = 0
    for plan in plans:
        for record, recipe in plan:
            stages = ", ".join(f"{stage} {(recipe.get(stage) or {}).get('plugin')}" for stage in ("extractor", "graph"))
            steps = (recipe.get("training") or {}).get("steps")
            log(f"{record.run_dir}: {record.variant} seed {record.seed} ({stages}; {steps} steps)")
            count += 1
    log(f"gem compare --dry-run: {count} runs, every recipe valid; nothing was trained or written")
    return count


def relation_aware(variants: dict[str, Variant]) -> dict[str, Variant]:
    """The same methods with the base recipe's graph learner in place of the identity graph (the
    GEM paper makes FactorVAE relation-aware this way); variants that choose a graph keep it."""
    out = {}
    for name, variant in variants.items():
        if variant.sections.get("graph") == _FLAT["graph"]:
            sections = {k: v for k, v in variant.sections.items() if k != "graph"}
            variant = Variant(f"{variant.description}; with the base recipe's graph learner", sections, variant.dynamic)
        out[name] = variant
    return out


def parse_variant(spec: Sequence[str]) -> tuple[str, Variant]:
    """``[name, "stage.key=value", ...]`` -> a :class:`Variant` (values parsed as YAML)."""
    name, *items = spec
    parsed = apply_overrides({}, items)
    bad = [k for k, v in parsed.items() if not isinstance(v, dict)]
    if bad:
        raise RecipeError(f"--variant {name}: {', '.join(bad)} must be written as stage.key=value")
    return name, Variant(f"custom: {' '.join(items)}", parsed)


def compare_main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    setup_from_args(args)

    def action() -> int:
        if args.recipe:
            base = load_recipe_file(args.recipe)
        else:
            base = copy.deepcopy(DEFAULT_RECIPE)
            for section, keys in COMPARE_DEFAULTS.items():
                base.setdefault(section, {}).update(keys)
        # Resolve defaults so each variant sees the base's plugin names and every option.
        registry = Registry(make_plugin_manager())
        base, notes = override_recipe(base, args.overrides, registry)
        for note in notes:
            logger.warning(f"gem compare: {note}")
        base = validate_recipe(base, registry).to_dict()
        variants = relation_aware(VARIANTS) if args.relation_aware else dict(VARIANTS)
        methods = list(args.methods)
        for spec in args.variant:
            name, variant = parse_variant(spec)
            variants[name] = variant
            if name not in methods:
                methods.append(name)
        if args.jobs < 1:
            raise RecipeError(f"--jobs must be >= 1, got {args.jobs}")
        options = dict(jobs=args.jobs, threads=args.threads, variants=variants, recipe_name=args.recipe or "")
        if args.dry_run:
            print_plan(base, methods, args.seeds, args.out, variants, parse_sweep(args.sweep) if args.sweep else None)
            return 0
        if args.sweep:
            key, values = parse_sweep(args.sweep)
            by_value = sweep(base, key, values, methods, args.seeds, args.out, **options)
            records = [r for recs in by_value.values() for r in recs]
            print(f"sweep: {args.out / 'sweep.md'}")
        else:
            records = compare(base, methods, args.seeds, args.out, **options)
        failed = [r for r in records if r.status == "failed"]
        if failed:
            print(f"gem compare: {len(failed)} of {len(records)} runs failed; see {args.out / 'report.md'}",
                  file=sys.stderr)
            return 1
        return 0

    return guard(action, args.debug, "gem compare")


if __name__ == "__main__":
    sys.exit(compare_main())

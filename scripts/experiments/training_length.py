"""How long must GEM train?  Disentanglement against training steps, from checkpoints of one long run.

For each method (a ``gem compare`` variant of the default synthetic recipe), one run trains to the
first step of ``--steps``, is evaluated, then resumes from its own checkpoint to the next step,
and so on: one long run evaluated along the way (a resumed run on one process is the same as an
uninterrupted one). At each checkpoint the ``disentanglement`` and ``reconstruction`` groups are
evaluated at the end-of-run sizes on independent factors and the run's metrics.json and traversal
figures are copied to ``<out>/<method>/steps/<step>/``. The table and figure report MCC, DCI-D and
MIG of both codes (μ and Aᵀμ) and PSNR per checkpoint.

A checkpoint whose copy exists is not computed again, so the script can be stopped and restarted.

    OMP_NUM_THREADS=1 /work/venv/bin/python scripts/experiments/training_length.py \
        --methods gem beta_vae --steps 1000 2000 4000 8000 16000 30000 --out runs/training-length \
        --table docs/results/training-length.md --figure docs/results/training-length.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

#: (column title, metrics.json path) of the table and the figure's panels.
COLUMNS = [
    ("MCC μ", "disentanglement.exogenous.spearman_mcc"),
    ("MCC Aᵀμ", "disentanglement.attribute.spearman_mcc"),
    ("DCI-D μ", "disentanglement.exogenous.dci_disentanglement"),
    ("DCI-D Aᵀμ", "disentanglement.attribute.dci_disentanglement"),
    ("MIG μ", "disentanglement.exogenous.mig"),
    ("MIG Aᵀμ", "disentanglement.attribute.mig"),
    ("FactorVAE μ", "disentanglement.exogenous.factorvae_score"),
    ("PSNR dB", "reconstruction.psnr"),
]


def lookup(metrics: dict, path: str) -> float:
    """The number at a dotted path of metrics.json (NaN where there is none), as gem compare reads it."""
    from gem.compare import _get

    value = _get(metrics, path)
    return float("nan") if value is None else value


def run_method(method: str, steps: list[int], out: Path, base_overrides: list[str], recipe: str) -> dict[int, dict]:
    import torch

    from gem.compare import VARIANTS
    from gem.evaluation import END_OF_RUN
    from gem.pipeline import run_recipe
    from gem.plugins import Registry, make_plugin_manager
    from gem.recipe import apply_overrides, load_recipe_file, validate_recipe

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    registry = Registry(make_plugin_manager())
    base = apply_overrides(load_recipe_file(recipe), base_overrides)
    data = VARIANTS[method].recipe(base)
    run_dir = out / method / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict] = {}
    for step in steps:
        kept = out / method / "steps" / str(step)
        if (kept / "metrics.json").is_file():
            results[step] = json.loads((kept / "metrics.json").read_text())
            continue
        data = apply_overrides(data, [f"training.steps={step}", f"name={method}", f"out={out}"])
        recipe = validate_recipe(data, registry)
        started = time.perf_counter()
        run_recipe(recipe, registry, run_dir, resume=(run_dir / "checkpoint").is_dir(),
                   eval_metrics=["disentanglement", "reconstruction"], eval_settings=END_OF_RUN)
        kept.mkdir(parents=True, exist_ok=True)
        for name in ("traversal_relation_aware.png", "traversal_independent.png", "loss_curves.png"):
            if (run_dir / "figures" / name).is_file():
                shutil.copy2(run_dir / "figures" / name, kept / name)
        shutil.copy2(run_dir / "metrics.json", kept / "metrics.json")
        results[step] = json.loads((kept / "metrics.json").read_text())
        print(f"{method} step {step}: {time.perf_counter() - started:.0f} s, "
              + ", ".join(f"{t} {lookup(results[step], p):.3f}" for t, p in COLUMNS), flush=True)
    return results


def write_table(all_results: dict[str, dict[int, dict]], path: Path) -> str:
    lines = ["| method | steps | " + " | ".join(t for t, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for method, results in all_results.items():
        for step in sorted(results):
            lines.append(f"| {method} | {step} | " + " | ".join(f"{lookup(results[step], p):.3f}" for _, p in COLUMNS)
                         + " |")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def draw(all_results: dict[str, dict[int, dict]], path: Path) -> None:
    from gem.figures import new_figure

    panels = [("MCC", "spearman_mcc"), ("DCI-D", "dci_disentanglement"), ("MIG", "mig")]
    fig = new_figure(4.2 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels))
    for ax, (title, key) in zip(axes, panels):
        for method, results in all_results.items():
            steps = sorted(results)
            for code, style in (("exogenous", "-"), ("attribute", "--")):
                if code == "attribute" and method not in ("gem", "gem_single"):
                    continue
                values = [lookup(results[s], f"disentanglement.{code}.{key}") for s in steps]
                label = f"{method} ({'μ' if code == 'exogenous' else 'Aᵀμ'})"
                ax.plot(steps, values, style, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("training steps")
        ax.set_ylabel(title)
        ax.set_title(f"{title} on independent factors")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["gem", "beta_vae"])
    p.add_argument("--steps", nargs="+", type=int, default=[1000, 2000, 4000, 8000, 16000, 30000])
    p.add_argument("--set", dest="overrides", action="append", default=["training.warmup_steps=600"],
                   help="recipe override applied to the default synthetic recipe (repeatable)")
    p.add_argument("--recipe", default="synthetic", help="base recipe (default: the shipped synthetic recipe)")
    p.add_argument("--out", type=Path, default=Path("runs/training-length"))
    p.add_argument("--table", type=Path, default=None)
    p.add_argument("--figure", type=Path, default=None)
    args = p.parse_args()
    all_results = {m: run_method(m, sorted(args.steps), args.out, args.overrides, args.recipe) for m in args.methods}
    text = write_table(all_results, args.table or args.out / "training-length.md")
    print(text)
    draw(all_results, args.figure or args.out / "training-length.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

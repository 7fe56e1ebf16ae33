"""The run report, built from the files in a run folder alone.

``gem-run`` writes it at the end of a run and ``gem eval`` writes it again after adding
metrics, so everything a run folder holds is shown, whoever computed it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gem.report import Report
from gem.somers_d import most_asymmetric_pair


#: The two codes disentanglement is measured on, in words (metrics.json, the report and gem compare).
CODE_MEANINGS = {
    "exogenous": "μ, the encoder's mean in bound attribute order: each attribute's own (exogenous) part, "
                 "before the relation graph",
    "attribute": "z_rel = Aᵀμ, the code the decoder reads: each attribute with what its parents pass on "
                 "through the learned graph A",
}
#: What the factor set of the evaluation images means, in words.
FACTOR_SET_MEANINGS = {
    "independent": "their factors were drawn independently of each other (not as in training), the usual "
                   "protocol for correlated data: a code scores well only if it separates the factors themselves",
    "training": "they are the data set's own images, so where its factors are correlated a code that mixes "
                "correlated factors is not penalised for it",
}


def codes_sentence() -> str:
    """One sentence per code, for captions."""
    return " ".join(f"The {code} code is {meaning}." for code, meaning in CODE_MEANINGS.items())


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def run_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The few numbers printed at the end of a run and shown first in the report."""
    rec = metrics.get("reconstruction", {})
    rels = metrics.get("relations", {})
    summary: dict[str, Any] = {}
    if rec:
        summary["recon MSE"] = rec["mse"]
        summary["recon PSNR (dB)"] = rec["psnr"]
    if "learned_vs_true" in rels:
        summary["|A - true| (MAE)"] = rels["learned_vs_true"]["mae"]
        summary["|S - true| (MAE)"] = rels["oracle_vs_true"]["mae"]
        summary["sign agreement A/true"] = rels["learned_vs_true"]["sign_agreement"]
    dis = metrics.get("disentanglement", {})
    for code, label in (("exogenous", "μ"), ("attribute", "Aᵀμ")):
        for key in ("spearman_mcc", "mig", "dci_disentanglement"):
            if key in dis.get(code, {}):
                summary[f"{key.replace('_', ' ')} ({label})"] = dis[code][key]
    if "training" in metrics:
        summary["train steps/s"] = metrics["training"]["steps_per_second"]
    if "run_seconds" in metrics:
        summary["run time (s)"] = metrics["run_seconds"]
    return summary


def _flat(value: Any) -> Any:
    if isinstance(value, (int, float, str)) or value is None:
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=120).strip()


def asymmetry_sentence(impact: dict[str, Any]) -> str:
    """One sentence naming the pair of attributes whose two directions in S differ most."""
    matrix, attrs = impact.get("oracle_impact"), impact.get("attributes") or []
    if matrix is None:
        return ""
    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    pair = most_asymmetric_pair(m)
    if pair is None:
        return ""
    i, j = pair
    a, b = attrs[i], attrs[j]
    return (f"S[{a} → {b}] = {m[i, j]:.2f} against S[{b} → {a}] = {m[j, i]:.2f} (outlined in the heatmap). "
            f"Knowing {a} orders {b} better than the other way round; this is the direction of prediction, "
            "not necessarily of cause: when a coarse attribute is set by a finer one, the larger entry runs "
            "from the coarse one (the effect) to the finer one (the cause).")


def write_run_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` from what the run folder holds."""
    run_dir = Path(run_dir)
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) if (run_dir / "recipe.yaml").is_file() else {}
    metrics = _load(run_dir / "metrics.json") or {}
    impact = _load(run_dir / "impact.json") or {}
    fig = run_dir / "figures"

    doc = Report(f"gem run: {recipe.get('name', run_dir.name)}")
    doc.add_table("Summary", run_summary(metrics))
    if recipe:
        plugins = {stage: recipe.get(stage, {}).get("plugin") for stage in ("dataset", "extractor", "oracle", "ranker", "graph")}
        training = recipe.get("training", {})
        doc.add_text("Recipe", f"Data set `{plugins['dataset']}`, extractor `{plugins['extractor']}`, oracle "
                               f"`{plugins['oracle']}`, ranker `{plugins['ranker']}`, graph learner `{plugins['graph']}`; "
                               f"{training.get('steps')} steps ({training.get('warmup_steps')} warm-up), batch "
                               f"{training.get('batch_size')}, seed {recipe.get('seed')}. The resolved recipe is in recipe.yaml.")
    images = [
        ("Relation-aware traversals", "traversal_relation_aware.png",
         "Each row sets one attribute's latent from low to high and decodes Aᵀz: the attributes it "
         "influences move with it. `gem explore` on this run folder opens a page with one slider per "
         "attribute, to move them yourself."),
        ("Independent traversals", "traversal_independent.png", "Each row changes only that attribute's decoder input."),
        ("Impact scores", "impact_heatmap.png",
         f"Somers' D from {impact.get('images_used', '?')} scored images; row i is the independent variable. "
         "An edge i → j says how well i's order predicts j's; its direction is not a causal direction "
         "(a coarse attribute set by a fine one gets the larger entry from effect to cause). "
         "Brackets: bootstrap confidence interval."),
        ("Relations: true, oracle and learned", "relations.png", ""),
    ]
    # Extractors with a second generator (Extractor.extra_decoders) get one figure per decoder.
    images[1:1] = [(f"Relation-aware traversals, {p.stem.removeprefix('traversal_relation_aware_')} decoder",
                    p.name, "The same codes as above, decoded by this extractor's other decoder.")
                   for p in sorted(fig.glob("traversal_relation_aware_*.png"))]
    for heading, name, caption in images:
        if (fig / name).is_file():
            doc.add_image(heading, fig / name, caption)
    pair_text = asymmetry_sentence(impact)
    if pair_text:
        doc.add_text("Most asymmetric pair", pair_text)
    for note in impact.get("notes", []):
        doc.add_text("Ranker note", note)
    rels = metrics.get("relations", {})
    if rels:
        doc.add_table("Relation recovery", [{"comparison": k.replace("_", " "), **v} for k, v in rels.items()],
                      "Off-diagonal mean/max absolute error and sign agreement (edges with |true| > 0.05).")
    if "reconstruction" in metrics:
        doc.add_table("Reconstruction (held-out images)", metrics["reconstruction"])
    dis = metrics.get("disentanglement", {})
    if dis:
        exo, attr = dis.get("exogenous", {}), dis.get("attribute", {})
        setting = dis.get("evaluation", {})
        factor_set = setting.get("factor_set", "training")
        doc.add_table("Disentanglement",
                      [{"metric": k, "exogenous code μ": exo.get(k, ""), "attribute code z_rel = Aᵀμ": attr.get(k, "")}
                       for k in dict.fromkeys([*exo, *attr])],
                      f"On {setting.get('pool', '?')} images with {factor_set} factors: "
                      + FACTOR_SET_MEANINGS[factor_set] + ". " + codes_sentence() + (" The learned graph is the identity here, so the two columns are one "
                                            "code." if setting.get("identity_graph") else ""))
        if dis.get("bound_rho"):
            doc.add_table("Binding quality",
                          [{"attribute": k, "Spearman ρ of its latent": v} for k, v in dis["bound_rho"].items()],
                          "Signed ρ between each bound latent (oriented by the binding) and the attribute's true "
                          "score: near +1 is a clean binding; a negative value means the binding's sign is wrong.")
    if (fig / "disentanglement.png").is_file():
        doc.add_image("Disentanglement metrics", fig / "disentanglement.png",
                      "disentanglement_lib's metrics on both codes.")
    if (fig / "relation_error.png").is_file():
        doc.add_image("Relation error per edge", fig / "relation_error.png",
                      "|S − true| with bootstrap intervals over the scored images; dots: |A − true| of the learned graph.")
    quality = metrics.get("oracle_quality")
    if quality:
        doc.add_table("Oracle quality",
                      [{"attribute": a, "accuracy": quality["accuracy"][a], "missing rate": quality["missing_rate"][a]}
                       for a in quality["accuracy"]],
                      f"Mean accuracy {quality['accuracy_mean']:.3g}, all-zero answers {quality['all_zero_rate']:.3g}, "
                      f"{quality['n_images']} images.")
    for note in metrics.get("eval", {}).get("notes", []):
        doc.add_text("Evaluation note", note)
    binding = metrics.get("binding")
    if binding:
        doc.add_table("Binding of latents to attributes",
                      [{"attribute": a, "latent": k, "sign": binding["sign"][a]} for a, k in binding["latent_of"].items()])
    for heading, name in (("Training curves", "loss_curves.png"), ("Oracle scores", "oracle_scores.png")):
        if (fig / name).is_file():
            doc.add_image(heading, fig / name)
    for section, heading in (("oracle", "Oracle"), ("data", "Data set"), ("training", "Training"),
                             ("fidelity", "Fidelity"), ("efficiency", "Efficiency")):
        if metrics.get(section):
            doc.add_table(heading, {k: _flat(v) for k, v in metrics[section].items()})
    return doc.write(run_dir, embed_images=(recipe.get("evaluation") or {}).get("report_figures", "embed") != "link")

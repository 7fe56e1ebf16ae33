"""Evaluation of a trained run: every metric group, computed once, in memory or from a run folder.

``gem-run`` calls :func:`evaluate` on the models it has just trained and :func:`record` writes the
result; ``gem eval`` does the same on a run loaded from its folder (:func:`evaluate_run`). The two
differ only in the sizes of :class:`EvalSettings` (:data:`END_OF_RUN` against the defaults).

``disentanglement``
    :func:`gem.disentanglement.compute_disentanglement` on two codes of a pool of
    ``n_train + n_test`` images (see :data:`CODES`): ``exogenous``, the bound latent means μ
    (latents in attribute order and orientation), and ``attribute``, z_rel = Aᵀμ, what the decoder
    reads (one computation when A = I). The pool is the data set's independent sample when it has
    one (factors independent of each other, ``evaluation.factor_set: independent``), else images
    drawn without replacement from the whole data set with ``numpy.random.default_rng(seed)``
    (``training``). With true attribute scores, ``spearman_mcc`` comes with ``bound_rho``, the
    signed Spearman ρ of each bound latent with its attribute. Skipped, with a note, without
    factors.
``reconstruction``
    MSE, PSNR (over the whole set) and SSIM (mean per image) of the mean reconstructions
    ``decode(Aᵀ mu)``, clamped to [0, 1], of the held-out images.
``fidelity``
    FID and KID (torchmetrics) of the held-out images against their reconstructions (what the
    GEM paper's Table 1 reports), plus ``fid_samples`` / ``kid_samples_*`` against images decoded
    from ``z ~ N(0, I)`` through the graph. Only with a feature extractor: the one given, else
    the standard Inception-v3 when torch-fidelity is importable; otherwise ``fid`` is null and
    ``notes`` says why. A failure of the default extractor (e.g. weights that cannot be
    downloaded) is also a note, never an error; an explicitly given extractor that cannot be
    loaded is an error before anything is computed.
``relations``
    The learned A against the oracle's S; with a known true impact matrix, S against it with a
    bootstrap over the scored images (:func:`gem.metrics.relation_error_bootstrap`, S recomputed
    by the run's own ranker without its own bootstrap), per-edge errors with intervals under
    ``relation_edges``, and the learned A's error (:func:`gem.metrics.relation_error`; one
    trained model, no interval).
``oracle_quality``
    :func:`gem.metrics.oracle_quality` of the run's scores against the data set's true
    attribute scores, when it has them.
``efficiency``
    :func:`gem.efficiency.efficiency_report` of the extractor: parameters, GFLOPs per image (one
    reconstruction), peak memory and time of a training step (:func:`gem.training.run_step`, as
    the training loop runs it) on a deep copy, so the trained weights are never changed; seconds
    per epoch = steps per epoch × mean step time.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from gem import figures
from gem import metrics as gem_metrics
from gem.binding import spearman_matrix
from gem.disentanglement import METRICS as DIS_METRICS
from gem.disentanglement import compute_disentanglement, resolve_metrics
from gem.efficiency import count_parameters, efficiency_report
from gem.data import uniform_rows
from gem.errors import ConfigurationError
from gem.interfaces import Extractor, ImageDataset
from gem.io import write_json
from gem.labels import auxiliary_variable
from gem.progress import logger, progress
from gem.relations import RelationModel
from gem.run_folder import TrainedRun, load_run
from gem.run_report import CODE_MEANINGS, write_run_report
from gem.training import encode_images, run_step, to_float

__all__ = ["GROUPS", "QUICK_METRICS", "EvalSettings", "END_OF_RUN", "select_metrics", "evaluate", "record",
           "evaluate_run", "traversals"]

#: The metric groups, in the order they are computed (and their metrics.json sections).
GROUPS = ("disentanglement", "reconstruction", "fidelity", "relations", "oracle_quality", "efficiency")

#: What each group computes, in the words of the progress messages.
GROUP_MEANINGS = {
    "disentanglement": "MCC, MIG, DCI, SAP, modularity, explicitness, FactorVAE and β-VAE scores of the codes "
                       "against the true factors",
    "reconstruction": "MSE, PSNR and SSIM of held-out images",
    "fidelity": "FID and KID of decoded images",
    "relations": "the learned graph and S against the true impact, with bootstrap intervals",
    "oracle_quality": "the oracle's scores against the true labels",
    "efficiency": "time and memory of training steps",
}

#: What a run evaluates with ``evaluation.full_metrics: false``: the groups that take seconds.
QUICK_METRICS = ("reconstruction", "relations", "oracle_quality", "spearman_mcc")

_ALIASES = {"fid": "fidelity", "kid": "fidelity", "mse": "reconstruction", "psnr": "reconstruction",
            "ssim": "reconstruction", "oracle": "oracle_quality", "relation": "relations"}


@dataclass(frozen=True)
class EvalSettings:
    """Sizes and seeds of an evaluation (``gem eval``'s options).

    ``n_train`` / ``n_test``: the disentanglement split (disentanglement_lib: 10,000 / 5,000; the
    pool has ``n_train + n_test`` images); ``dci_n_train`` / ``dci_n_test``: when given, DCI alone
    uses a split of this size of the same pool (DCI is by far the slowest metric); ``seed``: pool
    choice, metric randomness, bootstrap, samples and the efficiency batch; ``feature_extractor``:
    FID/KID features (see :mod:`gem.fidelity`; None = Inception-v3 when torch-fidelity is
    installed, else no FID and a note); ``fid_images``: held-out images for FID/KID (None = all);
    ``n_boot``: bootstrap replicates of the relation error; ``efficiency_steps`` /
    ``efficiency_warmup``: timed and untimed training steps.
    """

    n_train: int = 10000
    n_test: int = 5000
    seed: int = 0
    feature_extractor: Any = None
    fid_images: Optional[int] = None
    dci_trees: int = 100
    dci_n_train: Optional[int] = None
    dci_n_test: Optional[int] = None
    n_jobs: int = 1
    n_boot: int = 200
    efficiency_steps: int = 10
    efficiency_warmup: int = 2

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_test < 0:
            raise ConfigurationError(f"n_train must be >= 1 and n_test >= 0; got {self.n_train} and {self.n_test}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["feature_extractor"] is not None and not isinstance(out["feature_extractor"], str):
            out["feature_extractor"] = type(self.feature_extractor).__name__
        return out


#: The sizes of the evaluation at the end of ``gem-run``: ``gem eval``'s, with DCI on a smaller
#: split of the same pool (see docs/design.md, "Evaluation sizes", for the timings behind it).
END_OF_RUN = EvalSettings(dci_n_train=5000, dci_n_test=2500)


def select_metrics(metrics: Optional[Sequence[str]]) -> tuple[list[str], Optional[list[str]]]:
    """Groups to compute and disentanglement metrics to run (None = all).

    Items are group names (or aliases such as ``fid``, ``ssim``) or disentanglement metric names
    / result keys (``mig``, ``dci``, ``dci_completeness`` ...), which imply the group.
    """
    if metrics is None:
        return list(GROUPS), None
    if isinstance(metrics, str):
        metrics = [metrics]
    items = [m.strip() for item in metrics for m in str(item).split(",") if m.strip()]
    if not items:
        return list(GROUPS), None
    keys = {key for _, ks in DIS_METRICS.values() for key in ks}
    groups, dis = set(), []
    for item in items:
        name = _ALIASES.get(item, item)
        if name in GROUPS:
            groups.add(name)
        elif item in DIS_METRICS or item in keys:
            groups.add("disentanglement")
            dis.append(item)
        else:
            raise ValueError(f"unknown metric {item!r}; choose groups ({', '.join(GROUPS)}) or disentanglement "
                             f"metrics ({', '.join(DIS_METRICS)})")
    return [g for g in GROUPS if g in groups], (resolve_metrics(dis) if dis else None)


#: The two codes every disentanglement metric is computed on, with what each one is.
CODES = CODE_MEANINGS


def _evaluation_pool(ds: ImageDataset, size: int, seed: int) -> tuple[ImageDataset, np.ndarray, str]:
    """Images to measure disentanglement on: ``(dataset, rows, factor set)``, from the data set's
    independent sample when it has one (``"independent"``), else its own images (``"training"``)."""
    if ds.independent_sample is not None:
        source, rows = ds.independent_sample(size, seed)
        return source, np.asarray(rows), "independent"
    return ds, uniform_rows(len(ds), size, seed), "training"


def _score_code(codes: np.ndarray, factors: np.ndarray, chosen: list[str], s: EvalSettings,
                timing: dict[str, float], label: str, bar: Any = None) -> dict[str, Any]:
    """Every chosen metric of one code, DCI on its own split when the settings give one."""
    separate_dci = "dci" in chosen and (s.dci_n_train is not None or s.dci_n_test is not None)
    dci_split = (s.dci_n_train if s.dci_n_train is not None else s.n_train,
                 s.dci_n_test if s.dci_n_test is not None else s.n_test)
    calls = ([([m for m in chosen if m != "dci"], s.n_train, s.n_test), (["dci"], *dci_split)] if separate_dci
             else [(chosen, s.n_train, s.n_test)])
    result: dict[str, Any] = {}
    for names, n_train, n_test in calls:
        if names:
            t0 = time.perf_counter()
            result.update(compute_disentanglement(codes, factors, seed=s.seed, n_train=n_train, n_test=n_test,
                                                  metrics=names, dci_trees=s.dci_trees, n_jobs=s.n_jobs,
                                                  on_metric=lambda name: _advance(bar, f"{label} {name}")))
            key = f"{label} dci" if names == ["dci"] else f"{label} metrics"
            timing[key] = time.perf_counter() - t0
    order = [key for name in DIS_METRICS for key in DIS_METRICS[name][1]]
    return {key: result[key] for key in order if key in result}


def _advance(bar: Any, done: str) -> None:
    if bar is None:
        return
    bar.set_postfix(done=done, refresh=False)
    bar.update(1)


def _disentanglement(run: TrainedRun, notes: list[str], dis_metrics: Optional[list[str]],
                     s: EvalSettings) -> Optional[dict[str, Any]]:
    started = time.perf_counter()
    if run.dataset.factors is None:
        notes.append("disentanglement: skipped, the data set has no ground-truth factors")
        return None
    ds, pool, factor_set = _evaluation_pool(run.dataset, s.n_train + s.n_test, s.seed)
    means = encode_images(run.extractor, ds.images, pool, run.device)
    relation = run.relation
    with torch.no_grad():
        mu = torch.from_numpy(means).to(run.device)
        codes = {"exogenous": relation.to_attributes(mu).float().cpu().numpy(),
                 "attribute": relation.to_attributes(relation(mu)).float().cpu().numpy()}
    identity = not relation.is_bound or np.allclose(run.learned_adjacency, np.eye(len(run.attributes)))
    factors = np.asarray(ds.factors)[pool]
    names = list(ds.factor_names) or [str(k) for k in range(factors.shape[1])]
    varying = [k for k in range(factors.shape[1]) if not np.all(factors[:, k] == factors[0, k])]
    if len(varying) < factors.shape[1]:
        dropped = [names[k] for k in range(factors.shape[1]) if k not in varying]
        notes.append(f"disentanglement: factor(s) {', '.join(dropped)} are constant over the pool and were left out")
    if not varying:
        notes.append("disentanglement: skipped, no factor varies over the pool")
        return None
    timing = {"encode": time.perf_counter() - started}
    chosen = dis_metrics if dis_metrics is not None else list(DIS_METRICS)
    result: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught, \
            progress(len(resolve_metrics(chosen)) * (1 if identity else 2), "disentanglement", unit="metric") as bar:
        warnings.simplefilter("always")
        result["exogenous"] = _score_code(codes["exogenous"], factors[:, varying], chosen, s, timing, "μ", bar)
        # With A = I the decoder reads μ itself: the two codes are one, scored once.
        result["attribute"] = (dict(result["exogenous"]) if identity else
                               _score_code(codes["attribute"], factors[:, varying], chosen, s, timing, "Aᵀμ", bar))
    for message in dict.fromkeys(str(w.message) for w in caught if "the pool has" in str(w.message)):
        notes.append(f"disentanglement: {message}")
    if "spearman_mcc" in chosen and ds.attribute_scores is not None and relation.is_bound:
        rho = spearman_matrix(codes["exogenous"], np.asarray(ds.attribute_scores)[pool].astype(float))
        result["bound_rho"] = {name: float(rho[i, i]) for i, name in enumerate(run.attributes)}
    result["evaluation"] = {
        "factor_set": factor_set, "pool": int(len(pool)), "n_train": int(s.n_train), "n_test": int(s.n_test),
        "seed": int(s.seed), "dci_trees": int(s.dci_trees), "bound": bool(relation.is_bound),
        "identity_graph": bool(identity), "codes": dict(CODES), "factors": [names[k] for k in varying],
        "seconds": timing}
    if "dci" in chosen and (s.dci_n_train is not None or s.dci_n_test is not None):
        result["evaluation"].update(dci_n_train=int(s.dci_n_train if s.dci_n_train is not None else s.n_train),
                                    dci_n_test=int(s.dci_n_test if s.dci_n_test is not None else s.n_test))
    return result


def _torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def _load_features(feature_extractor: Any, notes: list[str]):
    """(extractor module or None, description) -- explicit specs must load, the default may not."""
    from gem import fidelity

    if feature_extractor is not None and not (isinstance(feature_extractor, str)
                                              and feature_extractor.lower() == "inception"):
        net = fidelity.load_feature_extractor(feature_extractor)   # errors are the user's to fix
        return net, feature_extractor if isinstance(feature_extractor, str) else type(feature_extractor).__name__
    if not _torch_fidelity_available():
        notes.append("fidelity: FID/KID not computed: torch-fidelity is not installed and no feature extractor "
                     "was given. " + fidelity.INSTALL_HINT)
        return None, None
    try:
        return fidelity.load_feature_extractor("inception"), "inception-v3 (torch-fidelity)"
    except Exception as exc:   # e.g. weights that cannot be downloaded offline
        notes.append(f"fidelity: FID/KID not computed: the Inception-v3 could not be loaded "
                     f"({type(exc).__name__}: {exc})")
        return None, None


@torch.no_grad()
def _reconstruction_and_fidelity(run: TrainedRun, notes: list[str], *, want_reconstruction: bool, net: Any,
                                 net_name: Optional[str], fid_images: Optional[int], seed: int,
                                 batch_size: int = 128) -> tuple[Optional[dict], Optional[dict], dict[str, float]]:
    """One pass over the held-out images: reconstruction metrics and, with ``net``, their features."""
    from gem import fidelity

    ext, relation, dev = run.extractor, run.relation, run.device
    idx = np.sort(run.split.held_out)
    n_fid = len(idx) if fid_images is None else min(int(fid_images), len(idx))
    if not want_reconstruction:
        idx = idx[:n_fid] if net is not None else idx[:0]
    ext.eval()
    sq, count, ssim_sum = 0.0, 0, 0.0
    feats: dict[str, list[torch.Tensor]] = {"real": [], "recon": [], "samples": []}
    generator = torch.Generator().manual_seed(int(seed))
    timing = {"reconstruction": 0.0, "fidelity": 0.0}
    for start in range(0, len(idx), batch_size):
        t0 = time.perf_counter()
        x = to_float(torch.from_numpy(np.asarray(run.dataset.images[idx[start:start + batch_size]]))).to(dev)
        recon = ext.decode(relation(ext.encode(x)[0])).float().clamp(0, 1)
        if want_reconstruction:
            sq += float((recon.double() - x.double()).pow(2).sum())
            count += x.numel()
            ssim_sum += fidelity.ssim(x, recon, data_range=1.0, device=dev) * len(x)
        t1 = time.perf_counter()
        timing["reconstruction"] += t1 - t0
        take = min(len(x), n_fid - start)
        if net is not None and take > 0:
            z = torch.randn(take, ext.latent_dim, generator=generator).to(dev)
            samples = ext.decode(relation(z)).float().clamp(0, 1)
            feats["real"].append(fidelity.extract_features(x[:take], net, device=dev))
            feats["recon"].append(fidelity.extract_features(recon[:take], net, device=dev))
            feats["samples"].append(fidelity.extract_features(samples, net, device=dev))
            timing["fidelity"] += time.perf_counter() - t1
    reconstruction = None
    if want_reconstruction:
        mse = sq / max(count, 1)
        reconstruction = {"mse": mse, "psnr": float(10 * np.log10(1.0 / mse)) if mse > 0 else math.inf,
                          "ssim": ssim_sum / max(len(idx), 1), "n_images": int(len(idx))}
    if net is None:
        return reconstruction, {"fid": None, "kid_mean": None, "notes": [n for n in notes if n.startswith("fidelity")]}, timing
    t0 = time.perf_counter()
    real, recon_f, samples_f = (torch.cat(feats[k]) for k in ("real", "recon", "samples"))
    fid_out: dict[str, Any] = {"feature_extractor": net_name, "feature_dim": int(real.shape[1]), "n_images": int(len(real))}
    if len(real) < 2:
        notes.append(f"fidelity: FID/KID need at least 2 held-out images; got {len(real)}")
        fid_out.update(fid=None, kid_mean=None)
    else:
        if len(real) <= real.shape[1]:
            notes.append(f"fidelity: {len(real)} images for {real.shape[1]} features: the covariances are singular "
                         "and FID is biased upwards; use more images (the literature uses 10,000-50,000)")
        fid_out["fid"] = fidelity.fid_from_features(real, recon_f)
        kid = fidelity.kid_from_features(real, recon_f, seed=seed)
        fid_out.update(kid_mean=kid["kid_mean"], kid_std=kid["kid_std"], kid_subset_size=kid["kid_subset_size"])
        fid_out["fid_samples"] = fidelity.fid_from_features(real, samples_f)
        kid = fidelity.kid_from_features(real, samples_f, seed=seed)
        fid_out.update(kid_samples_mean=kid["kid_mean"], kid_samples_std=kid["kid_std"])
    fid_out["compared"] = "held-out images vs their reconstructions (fid, kid_*) and vs decoded N(0, I) samples (*_samples)"
    timing["fidelity"] += time.perf_counter() - t0
    return reconstruction, fid_out, timing


def _impact_without_bootstrap(run: TrainedRun) -> Callable[[np.ndarray], np.ndarray]:
    """The run's own ranker, without its bootstrap, as scores -> impact matrix."""
    changes = {"bootstrap": 0} if run.context.has_option("ranker", "bootstrap") else {}
    ranker = run.context.build("ranker", **changes)
    return lambda scores: np.asarray(ranker.rank(np.asarray(scores, dtype=float)).impact, dtype=float)


def _relations(run: TrainedRun, notes: list[str], *, n_boot: int, seed: int) -> tuple[dict, Optional[dict]]:
    learned = run.learned_adjacency
    oracle = run.impact.get("oracle_impact")
    out: dict[str, Any] = {}
    if oracle is not None:
        out["learned_vs_oracle"] = gem_metrics.relation_error(learned, oracle)
    true = run.dataset.true_impact
    if true is None:
        notes.append("relations: no true impact matrix for this data set; only A against the oracle's S is scored")
        return out, None
    true = np.asarray(true, dtype=float)
    boot = gem_metrics.relation_error_bootstrap(run.scores, true, _impact_without_bootstrap(run), n_boot=n_boot, seed=seed)
    out["oracle_vs_true"] = {k: boot[k] for k in ("mae", "max_abs", "sign_agreement", "n_edges", "n_sign_edges",
                                                   "mae_ci", "sign_agreement_ci")}
    out["learned_vs_true"] = gem_metrics.relation_error(learned, true)
    off = ~np.eye(len(true), dtype=bool)
    learned_error = np.where(off, np.abs(learned - true), 0.0)
    edges = {"attributes": run.attributes, "true_impact": true, "oracle_impact": boot["impact"],
             "impact_ci_low": boot["impact_ci_low"], "impact_ci_high": boot["impact_ci_high"],
             "oracle_error": boot["edge_error"], "oracle_error_ci_low": boot["edge_error_ci_low"],
             "oracle_error_ci_high": boot["edge_error_ci_high"], "learned_adjacency": learned,
             "learned_error": learned_error, "n_boot": boot["n_boot"], "alpha": boot["alpha"],
             "resampled": boot["resampled"], "scored_images": int(len(run.scores))}
    return out, edges


def _efficiency(run: TrainedRun, s: EvalSettings) -> dict[str, Any]:
    topts = run.recipe.training
    dev, acc = run.device, run.context.accelerator
    extractor = copy.deepcopy(run.extractor).to(dev).train()
    relation: RelationModel = copy.deepcopy(run.relation).to(dev).train()
    optimizers = extractor.configure_optimizers()
    graph_optimizer = (torch.optim.Adam(relation.parameters(), lr=topts.graph_lr)
                       if relation.graph.trainable and relation.is_bound else None)
    train = run.split.train
    batch = min(topts.batch_size, len(train))
    idx = np.sort(np.random.default_rng(s.seed).choice(train, size=batch, replace=False))
    x = to_float(torch.from_numpy(np.asarray(run.dataset.images[idx]))).to(dev)
    auxiliary = auxiliary_variable(extractor, run.dataset)
    extra = {} if auxiliary is None else {"u": torch.from_numpy(auxiliary[idx]).to(dev)}
    steps_per_epoch = max(len(train) // batch, 1)
    out = efficiency_report(extractor, x, forward=lambda t: extractor.decode(relation(extractor.encode(t)[0])),
                            step=lambda: run_step(extractor, relation, optimizers, graph_optimizer, acc, x, 0,
                                                  **extra),
                            n_steps=s.efficiency_steps, warmup=s.efficiency_warmup,
                            steps_per_epoch=steps_per_epoch, device=dev)
    out.update(relation_params_m=count_parameters(relation) / 1e6, batch_size=int(batch),
               steps_per_epoch=int(steps_per_epoch), device=str(dev),
               measured="one training step (gem.training.run_step) on a copy; "
                        "GFLOPs of one reconstruction decode(A^T mu)")
    return out


# ---------------------------------------------------------------------------------------------
# evaluating and recording
# ---------------------------------------------------------------------------------------------

def evaluate(run: TrainedRun, metrics: Optional[Sequence[str]] = None,
             settings: EvalSettings = EvalSettings()) -> dict[str, Any]:
    """Compute the chosen metric groups of a trained run, each once.

    Parameters
    ----------
    run : the run, in memory (``gem-run``) or from :func:`gem.run_folder.load_run`
    metrics : groups (``disentanglement``, ``reconstruction``, ``fidelity``, ``relations``,
        ``oracle_quality``, ``efficiency``; aliases ``fid``, ``kid``, ``mse``, ``psnr``, ``ssim``,
        ``oracle``) and/or disentanglement metrics (``mig``, ``dci``, ... or their result keys,
        which select the disentanglement group with only those metrics); None = everything
    settings : sizes and seeds (:class:`EvalSettings`)

    Each group is announced (what it computes) and timed on the ``gem`` logger.

    Returns
    -------
    dict: one entry per computed section, ``relation_edges`` (per-edge errors with intervals,
    when the true impact is known), ``notes`` (list of str), ``seconds`` (per group) and
    ``settings``.
    """
    groups, dis_metrics = select_metrics(metrics)
    notes: list[str] = list(run.notes)
    seconds: dict[str, float] = {}
    s = settings
    # An explicit feature extractor must load before any work is done.
    net, net_name = _load_features(s.feature_extractor, notes) if "fidelity" in groups else (None, None)
    result: dict[str, Any] = {}

    announced = [g for g in GROUPS if g in groups]

    def announce(*names: str) -> float:
        for name in names:
            logger.info(f"evaluation {announced.index(name) + 1}/{len(announced)}: {name}, {GROUP_MEANINGS[name]}")
        return time.perf_counter()

    def timed(group: str, started: float, took: Optional[float] = None) -> None:
        seconds[group] = time.perf_counter() - started if took is None else took
        logger.info(f"evaluation: {group} took {seconds[group]:.1f} s")

    if "disentanglement" in groups:
        t0 = announce("disentanglement")
        dis = _disentanglement(run, notes, dis_metrics, s)
        if dis is not None:
            result["disentanglement"] = dis
        timed("disentanglement", t0)
    if "reconstruction" in groups or "fidelity" in groups:
        announce(*(g for g in ("reconstruction", "fidelity") if g in groups))
        rec, fid, timing = _reconstruction_and_fidelity(
            run, notes, want_reconstruction="reconstruction" in groups, net=net, net_name=net_name,
            fid_images=s.fid_images, seed=s.seed)
        for group, values in (("reconstruction", rec), ("fidelity", fid if "fidelity" in groups else None)):
            if values is not None:
                result[group] = values
                timed(group, 0.0, took=timing[group])  # both groups come from one pass over the images
    if "relations" in groups:
        t0 = announce("relations")
        rels, edges = _relations(run, notes, n_boot=s.n_boot, seed=s.seed)
        result["relations"] = rels
        if edges is not None:
            result["relation_edges"] = edges
        timed("relations", t0)
    if "oracle_quality" in groups:
        t0 = announce("oracle_quality")
        labels = run.dataset.attribute_scores
        if labels is None:
            notes.append("oracle_quality: skipped, the data set has no true attribute scores")
        else:
            result["oracle_quality"] = gem_metrics.oracle_quality(run.scores, np.asarray(labels)[run.score_indices],
                                                                  run.attributes)
        timed("oracle_quality", t0)
    if "efficiency" in groups:
        t0 = announce("efficiency")
        result["efficiency"] = _efficiency(run, s)
        timed("efficiency", t0)
    result.update(notes=notes, seconds=seconds,
                  settings={"metrics": groups, "disentanglement_metrics": dis_metrics or "all", **s.to_dict(),
                            "feature_extractor": net_name})
    return result


#: Sections replaced as a whole: their numbers only make sense together (one feature
#: extractor, one measurement); the others are merged key by key.
_REPLACED = {"fidelity", "efficiency", "oracle_quality", "relation_edges"}


def _merge(metrics: dict[str, Any], section: str, values: dict[str, Any]) -> None:
    current = metrics.get(section)
    if section in _REPLACED or not isinstance(current, dict):
        metrics[section] = dict(values)
        return
    merged = dict(current)
    for key, value in values.items():
        # A code's metrics (disentanglement.exogenous, .attribute) merge metric by metric.
        old = merged.get(key)
        merged[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) and key in CODES else value
    metrics[section] = merged


def record(run_dir: Union[str, Path], result: dict[str, Any], write_report: bool = True,
           extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Merge an :func:`evaluate` result into ``run_dir/metrics.json`` (other sections and keys are
    kept, recomputed ones replaced; settings, timings and notes go under ``eval``; ``extra`` keys
    are set as given), draw its figures and rebuild the report. Returns the merged metrics."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    for section in (*GROUPS, "relation_edges"):
        if section in result:
            _merge(stored, section, result[section])
    stored["eval"] = {"settings": result["settings"], "seconds": result["seconds"], "notes": result["notes"]}
    stored.update(extra or {})
    write_json(path, stored)
    folder = run_dir / "figures"
    folder.mkdir(exist_ok=True)
    if "disentanglement" in result:
        dis = stored["disentanglement"]
        figures.plot_disentanglement({code: dis.get(code, {}) for code in CODES}, folder / "disentanglement.png",
                                     dis.get("evaluation", {}).get("factor_set", "training"))
    if "relation_edges" in result:
        figures.plot_relation_error(result["relation_edges"], folder / "relation_error.png")
    if write_report:
        write_run_report(run_dir)
    return stored


def evaluate_run(run: Union[str, Path, TrainedRun], metrics: Optional[Sequence[str]] = None, *,
                 settings: EvalSettings = EvalSettings(), registry: Any = None, accelerator: Any = None,
                 write_report: bool = True) -> dict[str, Any]:
    """:func:`evaluate` a run (a folder is loaded with :func:`gem.run_folder.load_run`) and
    :func:`record` the result in its folder. Returns the :func:`evaluate` result with
    ``run_dir`` and the loading time in ``seconds["load"]``."""
    started = time.perf_counter()
    if not isinstance(run, TrainedRun):
        logger.info(f"loading the run in {run}")
        run = load_run(run, registry, accelerator=accelerator)
    loaded = time.perf_counter() - started
    result = evaluate(run, metrics, settings)
    result["seconds"] = {"load": loaded, **result["seconds"]}
    record(run.run_dir, result, write_report)
    result["seconds"]["total"] = time.perf_counter() - started
    result["run_dir"] = str(run.run_dir)
    return result


@torch.no_grad()
def traversals(model: Extractor, relation: RelationModel, image: np.ndarray, values: np.ndarray,
               device: torch.device, decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
               independent: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Traversal grids (n_attributes, len(values), H, W, 3), rows in attribute order.

    Relation-aware: attribute i's latent is set to each value and the code passes through the
    graph, so the attributes it influences move too. Independent: the decoder input of
    attribute i alone is set to each value (no propagation through A). ``decode`` replaces
    ``model.decode`` (e.g. one of :meth:`Extractor.extra_decoders`); ``independent=False`` skips
    the independent grid (None), which halves the work of a slow decoder.
    """
    decode = decode or model.decode
    model.eval()
    x = to_float(torch.from_numpy(np.array(image)[None])).to(device)
    mu, _ = model.encode(x)
    z_attr = relation.to_attributes(mu)[0]
    zr_attr = relation.to_attributes(relation(mu))[0]
    values_t = torch.as_tensor(values, dtype=mu.dtype, device=device)
    related, unrelated = [], []
    for i in range(len(z_attr)):
        codes = z_attr.repeat(len(values), 1)
        codes[:, i] = values_t
        related.append(decode(relation(relation.from_attributes(codes))))
        if independent:
            codes = zr_attr.repeat(len(values), 1)
            codes[:, i] = values_t
            unrelated.append(decode(relation.from_attributes(codes)))
    model.train()

    def grid(rows):
        return torch.stack(rows).permute(0, 1, 3, 4, 2).float().cpu().numpy()

    return grid(related), (grid(unrelated) if independent else None)

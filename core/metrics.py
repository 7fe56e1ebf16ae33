"""Evaluation metrics on plain arrays: relation recovery, Spearman MCC and oracle quality."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from gem.binding import match_abs, spearman_matrix, to_numpy

__all__ = ["relation_error", "relation_error_bootstrap", "spearman_mcc", "oracle_quality"]


def relation_error(learned: Any, true: Any, sign_threshold: float = 0.05) -> dict:
    """Error between a learned and the ground-truth impact matrix, off-diagonal edges only.

    Parameters
    ----------
    learned, true : arrays (n, n)
    sign_threshold : float
        Only edges with ``|true| > sign_threshold`` count for the sign agreement.

    Returns
    -------
    dict
        ``mae`` and ``max_abs``: mean and max absolute error over the off-diagonal edges;
        ``sign_agreement``: fraction of the counted edges where the signs agree (nan if none);
        ``n_edges``: number of off-diagonal edges; ``n_sign_edges``: edges counted for the sign.
    """
    learned, true = to_numpy(learned), to_numpy(true)
    if learned.shape != true.shape or learned.ndim != 2 or learned.shape[0] != learned.shape[1]:
        raise ValueError(f"need two square matrices of the same shape; got {learned.shape} and {true.shape}")
    off = ~np.eye(len(true), dtype=bool)
    err = np.abs(learned - true)[off]
    strong = off & (np.abs(true) > sign_threshold)
    n_sign = int(strong.sum())
    agree = float(np.mean(np.sign(learned[strong]) == np.sign(true[strong]))) if n_sign else math.nan
    return {
        "mae": float(err.mean()) if err.size else math.nan,
        "max_abs": float(err.max()) if err.size else math.nan,
        "sign_agreement": agree,
        "n_edges": int(off.sum()),
        "n_sign_edges": n_sign,
    }


def spearman_mcc(latents: Any, factors: Any) -> dict:
    """Mean |Spearman rho| of factors and latents matched one-to-one (Hungarian on |rho|).

    Parameters
    ----------
    latents : array (N, d)
    factors : array (N, k)

    Returns
    -------
    dict
        ``mcc``: mean |rho| over the ``min(k, d)`` matched pairs; ``matched``: list of
        (factor, latent) index pairs; ``matched_rho``: their signed rho.
    """
    rho = spearman_matrix(factors, latents)
    rows, cols = match_abs(rho)
    matched_rho = rho[rows, cols]
    return {
        "mcc": float(np.mean(np.abs(matched_rho))) if len(rows) else math.nan,
        "matched": [(int(f), int(z)) for f, z in zip(rows, cols)],
        "matched_rho": [float(r) for r in matched_rho],
    }


def relation_error_bootstrap(scores: Any, true: Any, impact_fn: Callable[[np.ndarray], Any], n_boot: int = 200,
                             alpha: float = 0.05, seed: int = 0, sign_threshold: float = 0.05) -> dict:
    """:func:`relation_error` of an impact matrix estimated from oracle scores, with bootstrap intervals.

    What is resampled: the **scored rows** (images). Each of ``n_boot`` replicates draws the N
    rows of ``scores`` with replacement, recomputes the impact matrix with ``impact_fn`` and
    compares it with ``true``, which stays fixed (it is a property of the data set). The
    intervals, at level ``1 - alpha``, measure how much the oracle's S, and its error, move with
    the choice of scored images. S's own intervals are percentile intervals. An error is biased
    upwards under resampling (a resampled S is noisier, and |S - true| folds noise into error),
    so the percentile interval of an error can lie wholly above the error it belongs to; its
    intervals are therefore bias-corrected: the percentiles shifted down by the replicates' mean
    excess over the point estimate (and kept >= 0), which puts them around the point estimate. A learned graph A is one
    trained model, not a function of resampled rows; score it with :func:`relation_error`.

    Parameters
    ----------
    scores : array (N, n)
        Oracle scores, one row per scored image (whatever ``impact_fn`` accepts, e.g. complete
        integer rows for ``gem.somers_d.somers_d_matrix``).
    true : array (n, n)
        Ground-truth impact matrix.
    impact_fn : callable (N, n) array -> (n, n) array
        How the impact matrix is computed from scores (e.g. ``somers_d_matrix``).
    n_boot : int
        Bootstrap replicates. alpha : float, 1 - confidence level. seed : int.
    sign_threshold : float
        As in :func:`relation_error`.

    Returns
    -------
    dict
        ``mae``, ``max_abs``, ``sign_agreement``, ``n_edges``, ``n_sign_edges``: the point
        estimate (:func:`relation_error` of ``impact_fn(scores)``); ``mae_ci``,
        ``sign_agreement_ci``: [low, high]; ``impact``: the (n, n) point estimate;
        ``impact_ci_low`` / ``impact_ci_high``: per-edge intervals of the impact;
        ``edge_error``: (n, n) |impact - true| and ``edge_error_ci_low`` / ``edge_error_ci_high``
        its per-edge intervals (diagonal 0); ``n_boot``, ``alpha``, ``resampled`` (a description).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    scores = np.asarray(scores)
    true = to_numpy(true)
    if scores.ndim != 2 or len(scores) < 1:
        raise ValueError(f"scores must be a non-empty (N, n) array; got shape {scores.shape}")
    impact = to_numpy(impact_fn(scores))
    point = relation_error(impact, true, sign_threshold)
    rng = np.random.default_rng(seed)
    off = ~np.eye(len(true), dtype=bool)
    strong = off & (np.abs(true) > sign_threshold)
    boot = np.empty((n_boot,) + impact.shape)
    for b in range(n_boot):
        boot[b] = to_numpy(impact_fn(scores[rng.integers(0, len(scores), len(scores))]))
    errors = np.abs(boot - true)
    errors[:, ~off] = 0.0
    maes = errors[:, off].mean(axis=1) if off.any() else np.full(n_boot, math.nan)
    signs = (np.mean(np.sign(boot[:, strong]) == np.sign(true[strong]), axis=1)
             if strong.any() else np.full(n_boot, math.nan))
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]

    def interval(values):
        return [float(v) for v in np.percentile(values, q)] if np.isfinite(values).all() else [math.nan, math.nan]

    def error_interval(values, estimate):
        if not np.isfinite(values).all():
            return [math.nan, math.nan]
        bias = float(np.mean(values)) - estimate
        return [max(0.0, float(v) - bias) for v in np.percentile(values, q)]

    edge_error = np.abs(impact - true)
    edge_error[~off] = 0.0
    edge_bias = errors.mean(axis=0) - edge_error
    return {
        **point,
        "mae_ci": error_interval(maes, point["mae"]),
        "sign_agreement_ci": interval(signs),
        "impact": impact,
        "impact_ci_low": np.percentile(boot, q[0], axis=0),
        "impact_ci_high": np.percentile(boot, q[1], axis=0),
        "edge_error": edge_error,
        "edge_error_ci_low": np.maximum(np.percentile(errors, q[0], axis=0) - edge_bias, 0.0),
        "edge_error_ci_high": np.maximum(np.percentile(errors, q[1], axis=0) - edge_bias, 0.0),
        "n_boot": int(n_boot),
        "alpha": float(alpha),
        "resampled": "rows of scores (images), with replacement; true impact fixed",
    }


def oracle_quality(scores: Any, labels: Any, attributes: Optional[Sequence[str]] = None,
                   binary: Union[None, bool, Sequence[bool]] = None, present_threshold: float = 3.0) -> dict:
    """How well an oracle's 0-5 scores match data set labels (paper Sec. 4.4, Figure 6).

    Parameters
    ----------
    scores : array (N, n)
        Oracle scores in 0..5, NaN where the oracle gave no valid answer.
    labels : int array (N, n)
        Ground truth: 0..5 scores, or binary labels (0 = absent; 5, or any positive value,
        = present) such as CelebA's attributes.
    attributes : names of the n attributes (default ``"0"``, ``"1"``, ...).
    binary : which attributes have binary labels: one bool for all, one per attribute, or None
        to decide per attribute (binary when its labels only take the values 0 and 5).
    present_threshold : a score ``>= present_threshold`` (default 3, the upper half of the
        scale) means "present" when compared with a binary label.

    Returns
    -------
    dict
        ``accuracy``: {attribute: fraction of answered images where the score matches the
        label}, exact match of the rounded score on the 0-5 scale, or present/absent agreement
        for a binary attribute; ``accuracy_mean``: the mean over attributes;
        ``missing_rate``: {attribute: fraction of images without a score};
        ``missing_rate_overall``: over all image-attribute pairs; ``all_zero_rate``: fraction
        of images whose every given score is 0 (at least one given) -- the "meaningless"
        answers of the paper; ``all_missing_rate``: images without any score;
        ``binary``: {attribute: bool}; ``n_images``: N.
    """
    scores = to_numpy(scores)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores and labels must be (N, n) arrays of the same shape; got {scores.shape} and {labels.shape}")
    n_rows, n = scores.shape
    names = [str(a) for a in attributes] if attributes is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} attribute names for {n} columns")
    if binary is None:
        flags = [bool(np.isin(labels[:, i], (0, 5)).all()) for i in range(n)]
    elif isinstance(binary, (bool, np.bool_)):
        flags = [bool(binary)] * n
    else:
        flags = [bool(b) for b in binary]
        if len(flags) != n:
            raise ValueError(f"binary has {len(flags)} entries for {n} attributes")
    given = ~np.isnan(scores)
    accuracy, missing = {}, {}
    for i, name in enumerate(names):
        ok = given[:, i]
        missing[name] = float(1.0 - ok.mean()) if n_rows else math.nan
        if not ok.any():
            accuracy[name] = math.nan
            continue
        s, y = scores[ok, i], labels[ok, i]
        if flags[i]:
            hit = (s >= present_threshold) == (y > 0)
        else:
            hit = np.floor(s + 0.5) == y
        accuracy[name] = float(hit.mean())
    values = [v for v in accuracy.values() if not math.isnan(v)]
    any_given = given.any(axis=1)
    all_zero = any_given & np.all(np.where(given, scores == 0, True), axis=1)
    return {
        "accuracy": accuracy,
        "accuracy_mean": float(np.mean(values)) if values else math.nan,
        "missing_rate": missing,
        "missing_rate_overall": float(1.0 - given.mean()) if given.size else math.nan,
        "all_zero_rate": float(all_zero.mean()) if n_rows else math.nan,
        "all_missing_rate": float((~any_given).mean()) if n_rows else math.nan,
        "binary": dict(zip(names, flags)),
        "n_images": int(n_rows),
    }

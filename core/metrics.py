"""Evaluation metrics on plain arrays (DESIGN.md section 4): reconstruction and relation recovery."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gem.binding import _to_numpy, match_abs, spearman_matrix

__all__ = ["mse", "psnr", "relation_error", "spearman_mcc"]


def mse(x: Any, y: Any) -> float:
    """Mean squared error over all elements.

    Parameters
    ----------
    x, y : arrays or torch tensors of the same shape

    Returns
    -------
    float
    """
    if hasattr(x, "detach") and hasattr(y, "detach"):
        return float(((x.detach().double() - y.detach().double()) ** 2).mean().item())
    x, y = _to_numpy(x), _to_numpy(y)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} and {y.shape}")
    return float(np.mean((x - y) ** 2))


def psnr(x: Any, y: Any, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 * log10(data_range**2 / mse(x, y))``.

    The MSE is the mean over the whole set (all images and pixels), not an average of
    per-image PSNRs. Images in [0, 1] use ``data_range=1``; identical inputs give inf.
    """
    error = mse(x, y)
    if error == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / error)


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
    learned, true = _to_numpy(learned), _to_numpy(true)
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

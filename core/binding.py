"""Bind unnamed latent dimensions to attributes.

Latent k is bound to attribute i by maximising the total |Spearman rho| between latent means
and oracle scores over the scored images (Hungarian matching), so node i of the relation graph
is a known latent dimension with a known sign.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

__all__ = ["Binding", "bind_latents", "spearman_matrix", "match_abs", "to_numpy"]


def to_numpy(x: Any) -> np.ndarray:
    """A float64 numpy copy of a numpy array or a torch tensor (any device)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _rank_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho of every column of a (m, p) with every column of b (m, q); no NaN inside.

    Average ranks for ties, then Pearson on the ranks. A constant column gives 0.
    """
    if len(a) < 2:
        return np.zeros((a.shape[1], b.shape[1]))
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    na = np.sqrt((ra ** 2).sum(axis=0))
    nb = np.sqrt((rb ** 2).sum(axis=0))
    cov = ra.T @ rb
    scale = np.outer(na, nb)
    rho = np.zeros_like(cov)
    np.divide(cov, scale, out=rho, where=scale > 0)
    return np.clip(rho, -1.0, 1.0)


def _mask_groups(valid: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group the columns of a (N, p) validity mask by identical masks: [(mask, columns)]."""
    groups: dict[bytes, tuple[np.ndarray, list[int]]] = {}
    for k in range(valid.shape[1]):
        col = valid[:, k]
        groups.setdefault(np.packbits(col).tobytes(), (col, []))[1].append(k)
    return [(mask, np.array(cols)) for mask, cols in groups.values()]


def spearman_matrix(x: Any, y: Any) -> np.ndarray:
    """Spearman rank correlation of every column of x with every column of y.

    Parameters
    ----------
    x : array (N, p)
    y : array (N, q)
        numpy arrays or torch tensors; NaN marks a missing value.

    Returns
    -------
    rho : float64 array (p, q)
        ``rho[i, k]`` is Spearman's rho (average ranks for ties, as ``scipy.stats.spearmanr``)
        over the rows where both ``x[:, i]`` and ``y[:, k]`` are present (pairwise deletion).
        A constant column, or fewer than 2 complete rows, gives 0 instead of nan.
    """
    x, y = to_numpy(x), to_numpy(y)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"x and y must be 2-D with the same number of rows; got {x.shape} and {y.shape}")
    rho = np.zeros((x.shape[1], y.shape[1]))
    for mask_x, cols_x in _mask_groups(~np.isnan(x)):
        for mask_y, cols_y in _mask_groups(~np.isnan(y)):
            rows = mask_x & mask_y
            rho[np.ix_(cols_x, cols_y)] = _rank_corr(x[rows][:, cols_x], y[rows][:, cols_y])
    return rho


def match_abs(rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of rows to columns maximising the total |rho|.

    Returns the matched (row indices, column indices), sorted by row; ``min(p, q)`` pairs.
    """
    rows, cols = linear_sum_assignment(np.abs(rho), maximize=True)
    return rows, cols


@dataclass
class Binding:
    """Which latent dimension stands for which attribute.

    Attributes
    ----------
    latent_of : int array (n,)
        ``latent_of[i]`` is the latent dimension bound to attribute i.
    sign : int array (n,)
        +1 or -1: the sign of Spearman's rho of attribute i with its latent (0 counts as +1).
    rho : float array (n, d)
        Spearman's rho of every attribute (rows) with every latent dimension (columns).
    """

    latent_of: np.ndarray
    sign: np.ndarray
    rho: np.ndarray


def bind_latents(latent_means: Any, scores: Any) -> Binding:
    """Bind each attribute to one latent dimension by Hungarian matching on |Spearman rho|.

    Parameters
    ----------
    latent_means : array (N, d)
        Posterior means of the scored images (numpy or torch).
    scores : array (N, n)
        Oracle scores, NaN where missing; a missing score excludes that row for its column only.

    Returns
    -------
    Binding
        Maximises the total |rho| over the n bound pairs; requires ``d >= n``.
    """
    latents, scores = to_numpy(latent_means), to_numpy(scores)
    if latents.ndim != 2 or scores.ndim != 2:
        raise ValueError(f"latent_means and scores must be 2-D; got {latents.shape} and {scores.shape}")
    d, n = latents.shape[1], scores.shape[1]
    if d < n:
        raise ValueError(f"cannot bind {n} attributes to {d} latent dimensions: need d >= n")
    rho = spearman_matrix(scores, latents)
    rows, cols = match_abs(rho)
    latent_of = np.empty(n, dtype=np.intp)
    latent_of[rows] = cols
    sign = np.where(rho[np.arange(n), latent_of] < 0, -1, 1).astype(np.intp)
    return Binding(latent_of=latent_of, sign=sign, rho=rho)

"""Somers' D of every ordered pair of score columns, and its bootstrap.

``S[i, j] == scipy.stats.somersd(scores[:, i], scores[:, j]).statistic``: column i is the
independent variable x, column j the dependent y, and the statistic is D(Y|X) =
(concordant - discordant) / (pairs not tied on x). S is asymmetric.

All n x n contingency tables come from one one-hot matrix product and every table is reduced
with vectorised cumulative sums, so there is no Python loop over attribute pairs. The
``somersd`` ranker plugin (:mod:`gem_plugins.somersd`) and the ground-truth impact of labelled
data sets (:func:`gem.labels.true_impact`) both use :func:`somers_d_matrix`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import sparse

__all__ = ["LEVELS", "somers_d_matrix", "somers_d_bootstrap", "most_asymmetric_pair"]

#: Number of score levels of the 0-5 oracle scale.
LEVELS = 6

#: Rows per block of the one-hot product; keeps the float32 block small and cache-friendly.
_CHUNK = 4096

#: Contingency-table cells of the bootstrap replicates reduced at once (bounds memory).
_BOOTSTRAP_CELLS = 1 << 21

#: Non-zeros of one block of the sparse row-to-cell incidence used by the bootstrap.
_SPARSE_NNZ = 1 << 21


def _as_codes(scores: np.ndarray, levels: int) -> np.ndarray:
    """Validate an (N, n) array of integer scores 0..levels-1 and return it as intp."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D (N, n) array, got shape {scores.shape}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if scores.dtype == bool:
        scores = scores.astype(np.intp)
    with np.errstate(invalid="ignore"):
        codes = scores.astype(np.intp, copy=False)
    if not np.issubdtype(scores.dtype, np.integer):
        bad = codes != scores
        if bad.any():
            value = scores[bad][0]
            raise ValueError(f"scores must be integers 0..{levels - 1}; found {value}")
    if codes.size:
        low, high = codes.min(), codes.max()
        if low < 0 or high >= levels:
            value = low if low < 0 else high
            raise ValueError(f"scores must lie in 0..{levels - 1}; found {value}")
    return codes


def _contingency(codes: np.ndarray, levels: int, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """All pairwise contingency tables G = O^T diag(w) O as an (n, L, n, L) float64 array.

    ``G[i, a, j, b]`` is the (weighted) number of rows with ``codes[:, i] == a`` and
    ``codes[:, j] == b``. Rows are processed in blocks of :data:`_CHUNK` and the blocks are
    summed in float64. Each block's product is float32 when that is exact (no weights, or
    integer weights with a total below 2**24: every partial sum is then an integer < 2**24),
    float64 otherwise.
    """
    n_rows, n = codes.shape
    width = n * levels
    G = np.zeros((width, width))
    if n_rows and n:
        chunk = min(_CHUNK, n_rows)
        exact32 = weights is None or (weights.sum() < 2 ** 24 and np.array_equal(weights, np.rint(weights)))
        dtype = np.float32 if exact32 else np.float64
        buf = np.zeros((chunk, width), dtype)
        flat = buf.reshape(-1)
        base = np.arange(chunk)[:, None] * width + np.arange(n) * levels
        for start in range(0, n_rows, chunk):
            block = codes[start:start + chunk]
            m = len(block)
            idx = (base[:m] + block).ravel()
            flat[idx] = 1.0
            O = buf[:m]
            if weights is None:
                G += O.T @ O
            else:
                G += (O * weights[start:start + m, None].astype(dtype)).T @ O
            flat[idx] = 0.0
    return G.reshape(n, levels, n, levels)


def _weighted_tables(codes: np.ndarray, levels: int, counts: np.ndarray) -> np.ndarray:
    """Contingency tables of many weightings of the same rows: (B, N) weights -> (B, n, L, n, L).

    Row r contributes ``counts[:, r]`` to cell ``(i, codes[r, i], j, codes[r, j])`` of every
    pair, so all B weightings are one sparse (N x (nL)^2 incidence) times dense product. It
    uses no BLAS threads, which keeps the bootstrap fast on a busy machine, and it is exact
    for integer counts.
    """
    n_rows, n = codes.shape
    width = n * levels
    n_boot = counts.shape[0]
    out = np.zeros((width * width, n_boot))
    onehot_col = codes + np.arange(n) * levels                      # (N, n) column in O
    block = max(1, _SPARSE_NNZ // max(1, n * n))
    for start in range(0, n_rows, block):
        c = onehot_col[start:start + block]
        m = len(c)
        cells = (c[:, :, None] * width + c[:, None, :]).reshape(-1)  # (m * n * n,)
        incidence = sparse.csr_matrix((np.ones(cells.size), cells, np.arange(0, cells.size + 1, n * n)),
                                      shape=(m, width * width))
        out += incidence.T @ counts[:, start:start + m].T
    return out.T.reshape(n_boot, n, levels, n, levels)


def _strict_suffix(x: np.ndarray, axis: int) -> np.ndarray:
    """Sum over indices strictly greater than each index along ``axis``."""
    return np.flip(np.cumsum(np.flip(x, axis), axis), axis) - x


def _d_from_tables(G: np.ndarray) -> np.ndarray:
    """Somers' D(column | row) of every table in G (..., n, L, n, L) -> (..., n, n).

    Follows scipy's ``_somers_d``: d = (P - Q) / (N^2 - sum_a r_a^2), where P and Q count
    ordered concordant / discordant pairs (twice the unordered counts) and r_a are the row
    (independent-variable) marginals. A zero denominator (the row attribute is constant, or the
    table is empty) gives 0.
    """
    T = np.moveaxis(G, -2, -3)                       # (..., n, n, L, L): T[i, j, a, b]
    R = _strict_suffix(T, -2)                         # sum over a' > a
    above = _strict_suffix(R, -1)                     # a' > a, b' > b  (concordant partners)
    below = R.sum(-1, keepdims=True) - R - above      # a' > a, b' < b  (discordant partners)
    p_minus_q = 2.0 * (T * (above - below)).sum((-2, -1))
    total = T.sum((-2, -1))
    rows = T.sum(-1)
    denom = total ** 2 - (rows ** 2).sum(-1)
    out = np.zeros_like(p_minus_q)
    np.divide(p_minus_q, denom, out=out, where=denom > 0)
    return out


def somers_d_matrix(scores: np.ndarray, weights: Optional[np.ndarray] = None, levels: int = LEVELS) -> np.ndarray:
    """Somers' D of every ordered pair of columns.

    Parameters
    ----------
    scores : array (N, n)
        Integer-valued scores in ``0 .. levels-1`` (no NaN; drop incomplete rows first).
    weights : array (N,), optional
        Non-negative per-row frequency weights (e.g. bootstrap multinomial counts); a row with
        weight k counts as k copies of that row.
    levels : int
        Number of score levels.

    Returns
    -------
    S : float64 array (n, n)
        ``S[i, j] == scipy.stats.somersd(scores[:, i], scores[:, j]).statistic``: column i is
        the independent variable x, column j the dependent y, D(Y|X) = (concordant -
        discordant) / (pairs not tied on x).

    Notes
    -----
    * Constant column i: every pair is tied on x, D is 0/0; ``S[i, :]`` is defined as 0
      (scipy returns nan). A constant column j has no concordant or discordant pair, so
      ``S[:, j]`` is 0 by the formula (scipy returns nan here too, because its table has one
      column).
    * Diagonal: ``S[i, i]`` is what the formula gives, 1 for every non-constant column (0 for
      a constant one).
    * Counts are accumulated in float64 and are exact integers while the squared (weighted)
      total is below 2**53, i.e. N up to about 9.4e7 rows; all contingency tables cost one
      one-hot product of O(N * (n * levels)**2) flops. Multithreaded OpenBLAS on an
      oversubscribed machine is much slower than one thread (set ``OPENBLAS_NUM_THREADS=1``
      there).
    """
    codes = _as_codes(scores, levels)
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (codes.shape[0],):
            raise ValueError(f"weights must have shape ({codes.shape[0]},), got {weights.shape}")
        if not np.all(np.isfinite(weights)) or (weights < 0).any():
            raise ValueError("weights must be finite and non-negative")
    return _d_from_tables(_contingency(codes, levels, weights))


def somers_d_bootstrap(scores: np.ndarray, n_boot: int, seed: Optional[int | np.random.Generator] = None,
                       levels: int = LEVELS) -> np.ndarray:
    """Somers' D matrices of ``n_boot`` bootstrap resamples of the rows, (n_boot, n, n).

    Each resample draws N rows with replacement (multinomial counts over the N rows, from
    ``numpy.random.default_rng(seed)``) and is reduced exactly like
    ``somers_d_matrix(scores, weights=counts)``. Replicates are reduced in groups whose
    contingency tables hold at most :data:`_BOOTSTRAP_CELLS` cells, which bounds memory.
    """
    codes = _as_codes(scores, levels)
    n_rows, n = codes.shape
    n_boot = int(n_boot)
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    if n_rows < 1 and n_boot:
        raise ValueError("the bootstrap needs at least 1 row of scores")
    replicates = np.empty((n_boot, n, n))
    if not n_boot:
        return replicates
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_rows, np.full(n_rows, 1.0 / n_rows), size=n_boot).astype(np.float64)
    group = max(1, _BOOTSTRAP_CELLS // max(1, (n * levels) ** 2))
    for start in range(0, n_boot, group):
        stop = min(start + group, n_boot)
        replicates[start:stop] = _d_from_tables(_weighted_tables(codes, levels, counts[start:stop]))
    return replicates


def most_asymmetric_pair(impact: np.ndarray) -> Optional[tuple[int, int]]:
    """The pair whose two directions differ most, as ``(i, j)`` with ``|S[i, j]| >= |S[j, i]|``
    (None for fewer than two attributes or no finite pair). Somers' D is asymmetric when the two
    attributes differ in how many levels they use: a coarse attribute set by a fine one gets the
    larger entry from the coarse one to the fine one."""
    m = np.asarray(impact, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        return None
    gap = np.abs(np.abs(m) - np.abs(m.T))
    gap[~np.isfinite(gap)] = -1.0
    np.fill_diagonal(gap, -1.0)
    i, j = np.unravel_index(int(np.argmax(gap)), gap.shape)
    if gap[i, j] < 0:
        return None
    return (int(i), int(j)) if abs(m[i, j]) >= abs(m[j, i]) else (int(j), int(i))

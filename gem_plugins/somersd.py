"""Somers' D ranker: the impact of attribute i on attribute j (DESIGN.md section 3, step 4).

``S[i, j] == scipy.stats.somersd(scores[:, i], scores[:, j]).statistic``: row i is the
independent variable x, column j the dependent y, and the statistic is D(Y|X) =
(concordant - discordant) / (pairs not tied on x). S is asymmetric.

All n x n contingency tables come from one one-hot matrix product and every table is reduced
with vectorised cumulative sums, so there is no Python loop over attribute pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import sparse

from gem import hookimpl
from gem.interfaces import BuildContext, Ranker, Ranking

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
      one-hot product of O(N * (n * levels)**2) flops. Measured: N=200,000, n=40 takes about
      0.15 s on two idle CPU cores (0.19 s with one BLAS thread); multithreaded OpenBLAS on an
      oversubscribed machine can be 20x slower (set ``OPENBLAS_NUM_THREADS=1`` there).
    """
    codes = _as_codes(scores, levels)
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (codes.shape[0],):
            raise ValueError(f"weights must have shape ({codes.shape[0]},), got {weights.shape}")
        if not np.all(np.isfinite(weights)) or (weights < 0).any():
            raise ValueError("weights must be finite and non-negative")
    return _d_from_tables(_contingency(codes, levels, weights))


@dataclass
class SomersDOptions:
    """Options of the ``somersd`` ranker.

    Attributes
    ----------
    bootstrap : int
        Number of bootstrap resamples for the per-edge confidence interval; 0 disables it.
    confidence : float
        Coverage of the percentile interval.
    seed : int or None
        Seed of the resampling; None uses the run seed (``context.seed``).
    """

    bootstrap: int = 200
    confidence: float = 0.95
    seed: Optional[int] = None


class SomersDRanker(Ranker):
    """Somers' D of every attribute pair (row i independent), with bootstrap intervals."""

    def __init__(self, options: Optional[SomersDOptions] = None, context: Optional[BuildContext] = None):
        self.options = options if options is not None else SomersDOptions()
        self.context = context
        if self.options.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0, got {self.options.bootstrap}")
        if not 0.0 < self.options.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.options.confidence}")

    def _labels(self, n: int) -> list[str]:
        """How notes and errors name each column: "attribute 'smile'" or "attribute 3"."""
        names: Sequence[str] = self.context.attributes if self.context is not None else ()
        if len(names) == n:
            return [f"attribute {str(name)!r}" for name in names]
        return [f"attribute {k}" for k in range(n)]

    def _seed(self) -> Optional[int]:
        if self.options.seed is not None:
            return self.options.seed
        return self.context.seed if self.context is not None else None

    def rank(self, scores: np.ndarray) -> Ranking:
        """Impact matrix of an (N, n) score matrix with NaN for missing scores.

        Rows with any NaN are dropped (and counted in the notes), the rest are rounded to the
        nearest integer and must lie in 0..5.
        """
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 2:
            raise ValueError(f"scores must be a 2-D (N, n) array, got shape {scores.shape}")
        n_total, n = scores.shape
        labels = self._labels(n)
        notes: list[str] = []

        missing = np.isnan(scores).any(axis=1)
        n_missing = int(missing.sum())
        if n_missing:
            notes.append(f"{n_missing} of {n_total} images had a missing score and were left out")
        kept = scores[~missing]
        rounded = np.rint(kept)
        bad = ~np.isfinite(rounded) | (rounded < 0) | (rounded > LEVELS - 1)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(f"score {float(kept[row, col])} of {labels[col]} is outside 0..{LEVELS - 1} "
                             f"(row {np.flatnonzero(~missing)[row]})")
        codes = rounded.astype(np.intp)
        n_used = len(codes)
        if n_used < 2:
            raise ValueError(f"Somers' D needs at least 2 images with a complete score; got {n_used} of {n_total}")

        impact = _d_from_tables(_contingency(codes, LEVELS))
        for k in range(n):
            values = np.unique(codes[:, k])
            if len(values) == 1:
                notes.append(f"{labels[k]} is constant (every score {values[0]}): its row is defined as 0 "
                             f"(Somers' D is 0/0 with it as the independent variable) and its column is 0")

        ci_low = ci_high = None
        B = int(self.options.bootstrap)
        if B:
            seed = self._seed()
            rng = np.random.default_rng(seed)
            counts = rng.multinomial(n_used, np.full(n_used, 1.0 / n_used), size=B).astype(np.float64)
            replicates = np.empty((B, n, n))
            # Tables of a group of replicates are reduced together; the group size bounds memory.
            group = max(1, _BOOTSTRAP_CELLS // (n * LEVELS) ** 2)
            for start in range(0, B, group):
                stop = min(start + group, B)
                replicates[start:stop] = _d_from_tables(_weighted_tables(codes, LEVELS, counts[start:stop]))
            alpha = 1.0 - self.options.confidence
            ci_low, ci_high = np.quantile(replicates, [alpha / 2, 1.0 - alpha / 2], axis=0)
            notes.append(f"bootstrap: {B} multinomial resamples of the {n_used} images, "
                         f"{self.options.confidence:.0%} percentile intervals, seed {seed}")
        return Ranking(impact=impact, ci_low=ci_low, ci_high=ci_high, n_used=n_used, notes=notes)


@hookimpl
def gem_register_rankers(register):
    register("somersd", SomersDRanker, options=SomersDOptions,
             description="Somers' D of every attribute pair, row i independent")

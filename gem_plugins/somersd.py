"""Somers' D ranker: the impact of attribute i on attribute j.

``impact[i, j] == scipy.stats.somersd(scores[:, i], scores[:, j]).statistic``: row i is the
independent variable x, column j the dependent y (D(Y|X), asymmetric). The maths, the matrix of
all pairs and its bootstrap, is :mod:`gem.somers_d`; this plugin drops incomplete rows, checks the
0-5 scale, names constant attributes and turns the bootstrap into percentile intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from gem import hookimpl
from gem.errors import DataError
from gem.interfaces import BuildContext, Ranker, Ranking
from gem.somers_d import LEVELS, somers_d_bootstrap, somers_d_matrix


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

    def __post_init__(self) -> None:  # checked with the recipe, before any data is loaded
        _check_options(self)


def _check_options(options: SomersDOptions) -> None:
    if options.bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {options.bootstrap}")
    if not 0.0 < options.confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {options.confidence}")


class SomersDRanker(Ranker):
    """Somers' D of every attribute pair (row i independent), with bootstrap intervals."""

    def __init__(self, options: Optional[SomersDOptions] = None, context: Optional[BuildContext] = None):
        self.options = options if options is not None else SomersDOptions()
        self.context = context
        _check_options(self.options)

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
            raise DataError(f"Somers' D needs at least 2 images with a complete score; got {n_used} of {n_total}")

        impact = somers_d_matrix(codes, levels=LEVELS)
        for k in range(n):
            values = np.unique(codes[:, k])
            if len(values) == 1:
                notes.append(f"{labels[k]} is constant (every score {values[0]}): its row is defined as 0 "
                             f"(Somers' D is 0/0 with it as the independent variable) and its column is 0")

        ci_low = ci_high = None
        B = int(self.options.bootstrap)
        if B:
            seed = self._seed()
            replicates = somers_d_bootstrap(codes, B, seed, levels=LEVELS)
            alpha = 1.0 - self.options.confidence
            ci_low, ci_high = np.quantile(replicates, [alpha / 2, 1.0 - alpha / 2], axis=0)
            notes.append(f"bootstrap: {B} multinomial resamples of the {n_used} images, "
                         f"{self.options.confidence:.0%} percentile intervals, seed {seed}")
        return Ranking(impact=impact, ci_low=ci_low, ci_high=ci_high, n_used=n_used, notes=notes)


@hookimpl
def gem_register_rankers(register):
    register("somersd", SomersDRanker, options=SomersDOptions,
             description="Somers' D of every attribute pair, row i independent")

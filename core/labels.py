"""Ground-truth labels in one place: their scale, their oracle-scale scores, the true impact matrix.

Labels are factor classes ``0 .. levels - 1`` (``ImageDataset.factors``) or 0-5 attribute scores
(``ImageDataset.attribute_scores``). Every place that brings them to a common scale uses
:func:`label_scale`, the largest label of a column: ``levels - 1``, at least 1 (so a one-level
factor is never divided by 0).

* :func:`class_scores`: factor classes to what a perfect oracle says on the 0-5 scale;
* :func:`true_impact`: the ground-truth impact matrix, Somers' D of the true attribute scores
  (:func:`gem.somers_d.somers_d_matrix`), the reference a ranker's estimate is scored against;
* :func:`auxiliary_variable` and :func:`auxiliary_scale`: the labels u that label-supervised
  extractors (``Extractor.auxiliary = "labels"``) learn from, and the divisor that maps u to [0, 1].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from gem.errors import ConfigurationError
from gem.somers_d import LEVELS as SCORE_LEVELS
from gem.somers_d import somers_d_matrix

if TYPE_CHECKING:  # gem.interfaces imports torch; gem.data imports this module and stays torch-free
    from gem.interfaces import ImageDataset

__all__ = ["SCORE_LEVELS", "MAX_SCORE", "label_scale", "class_scores", "true_impact", "auxiliary_variable",
           "auxiliary_scale"]

#: The largest score of the 0-5 oracle scale (``SCORE_LEVELS`` = 6 levels).
MAX_SCORE = SCORE_LEVELS - 1


def label_scale(levels: Sequence[int] | np.ndarray | int) -> np.ndarray:
    """The largest label of a column with ``levels`` classes: ``levels - 1``, at least 1 (float64).

    A scalar gives a 0-d array; ``label_scale(SCORE_LEVELS)`` is 5, the top of the oracle scale.
    """
    return np.maximum(np.asarray(levels, dtype=np.float64) - 1.0, 1.0)


def class_scores(classes: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """Oracle-scale scores of factor classes: ``round(class / label_scale(levels) * 5)``, int (N, K) 0..5.

    What a perfect oracle says about a factor (a one-level factor scores 0); halves round up.
    """
    return np.floor(np.asarray(classes) / label_scale(levels) * MAX_SCORE + 0.5).astype(np.int64)


def true_impact(attribute_scores: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """The ground-truth impact matrix (n, n) of integer 0-5 attribute scores (N, n).

    ``true_impact(s)[i, j] == scipy.stats.somersd(s[:, i], s[:, j]).statistic`` (row i
    independent); ``weights`` (N,) are per-row frequency weights, e.g. the sampling weights of a
    correlated data set. Constant columns give 0 rows and columns (see
    :func:`gem.somers_d.somers_d_matrix`).
    """
    return somers_d_matrix(attribute_scores, weights=weights, levels=SCORE_LEVELS)


def auxiliary_variable(extractor: Any, dataset: "ImageDataset", plugin: Optional[str] = None) -> Optional[np.ndarray]:
    """The auxiliary variable u an extractor asks for (``Extractor.auxiliary``), one row per image.

    None when the extractor asks for none; the data set's factors, else its attribute scores, as
    float32 for ``"labels"``. Raises :class:`gem.errors.ConfigurationError` (a ValueError) for any
    other kind, or when the data set has no labels.
    """
    kind = getattr(extractor, "auxiliary", None)
    if kind is None:
        return None
    if kind != "labels":
        raise ConfigurationError(f"extractor {plugin!r} asks for the auxiliary variable {kind!r}; "
                                 "gem provides 'labels'")
    labels = dataset.factors if dataset.factors is not None else dataset.attribute_scores
    if labels is None:
        raise ConfigurationError(f"extractor {plugin!r} learns from labels (auxiliary variable u), but this data set "
                                 "has neither ground-truth factors nor attribute scores; use a data set with labels "
                                 "(synthetic, shapes3d, dsprites, celeba) or another extractor")
    return np.asarray(labels, dtype=np.float32)


def auxiliary_scale(dataset: Optional["ImageDataset"]) -> Optional[np.ndarray]:
    """The largest value of each column of the labels :func:`auxiliary_variable` hands out
    (:func:`label_scale`): levels − 1 for factors (the largest class present when the levels are
    not given), 5 for 0-5 attribute scores, at least 1. Methods divide u by it to bring labels to
    [0, 1]. None when there is no data set or it has no labels."""
    if dataset is None:
        return None
    if dataset.factors is not None:
        factors = np.asarray(dataset.factors)
        k = factors.shape[1]
        levels = np.asarray(dataset.factor_levels, dtype=np.float64)
        if len(levels) != k:  # levels not given: the largest class present is the top label
            levels = factors.max(axis=0) + 1.0 if len(factors) else np.ones(k)
    elif dataset.attribute_scores is not None:
        levels = np.full(np.asarray(dataset.attribute_scores).shape[1], SCORE_LEVELS)
    else:
        return None
    return label_scale(levels)

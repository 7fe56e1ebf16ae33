"""The ``labels`` relation oracle: scores from the data set's own labels, offline.

It answers what a perfect MLLM would (the true 0-5 score of each attribute), optionally with
errors that mimic an imperfect one, so the whole pipeline runs without a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from gem import hookimpl
from gem.errors import ConfigurationError
from gem.interfaces import BuildContext, RelationOracle


@dataclass
class LabelsOracleOptions:
    error_rate: float = 0.0
    """Probability that a score is replaced by a uniformly random score 0-5."""
    missing_rate: float = 0.0
    """Probability that a score is missing (as when an MLLM gives no valid answer)."""
    seed: Optional[int] = None
    """Seed of the simulated errors; defaults to the recipe's seed."""

    def __post_init__(self) -> None:
        for name in ("error_rate", "missing_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


class LabelsOracle(RelationOracle):
    """Looks up ``dataset.attribute_scores``; errors are a deterministic function of (seed, image)."""

    def __init__(self, options: LabelsOracleOptions, context: BuildContext):
        dataset = context.dataset
        if dataset is None or dataset.attribute_scores is None:
            raise ConfigurationError("the 'labels' oracle needs a data set with attribute labels or factors; "
                                     "this data set has none, so choose another oracle")
        self.options = options
        self.seed = context.seed if options.seed is None else options.seed
        self.dataset = dataset
        self.cache_key = f"labels/error={options.error_rate}/missing={options.missing_rate}/seed={self.seed}"

    def score(self, images: np.ndarray, indices: np.ndarray, attributes: Sequence[str]) -> np.ndarray:
        known = self.dataset.attributes
        missing = [a for a in attributes if a not in known]
        if missing:
            raise ConfigurationError(f"the labels oracle has no label for {missing}; "
                                     f"known attributes: {', '.join(known)}")
        columns = [known.index(a) for a in attributes]
        scores = self.dataset.attribute_scores[np.asarray(indices)][:, columns].astype(np.float64)
        if self.options.error_rate > 0 or self.options.missing_rate > 0:
            for row, index in enumerate(indices):
                rng = np.random.default_rng([self.seed, int(index)])
                wrong = rng.random(len(columns)) < self.options.error_rate
                scores[row, wrong] = rng.integers(0, 6, size=int(wrong.sum()))
                scores[row, rng.random(len(columns)) < self.options.missing_rate] = np.nan
        return scores


@hookimpl
def gem_register_oracles(register):
    register("labels", LabelsOracle, options=LabelsOracleOptions,
             description="scores from the data set's labels, with optional simulated MLLM errors")

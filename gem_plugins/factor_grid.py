"""What the factor-grid data sets (shapes3d, dsprites) share once their file is read: the
preprocessing cache, the chosen factors, oracle-scale scores, correlated sampling and the
true impact matrix."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from gem.data import FactorDataOptions, build_array_cache, cache_file, plan_correlation, uniform_rows
from gem.interfaces import ImageDataset
from gem.labels import class_scores, true_impact


def factor_grid_dataset(source: str, path: Path, n_source: int, order: np.ndarray,
                        read_blocks: Callable[[], Iterable], options: FactorDataOptions, classes: np.ndarray,
                        levels: Mapping[str, int], default_pairs: list[list[str]], seed: int, cache_dir: Path,
                        description: str) -> ImageDataset:
    """The data set of ``order`` (rows of the source file, in training order).

    ``classes`` (n_source, len(levels)) holds every factor's class in ``levels`` order;
    ``read_blocks()`` yields (cache rows, images) blocks for :func:`gem.data.build_array_cache`.
    The true impact is Somers' D of the scores under the sampling weights, i.e. the relations of
    the distribution the model trains on.
    """
    stat = path.stat()
    cache = cache_file(cache_dir, source, {"file": str(path.resolve()), "bytes": stat.st_size,
                                           "mtime": int(stat.st_mtime), "image_size": options.image_size},
                       [hashlib.sha1(order.tobytes()).hexdigest()])
    images = build_array_cache(cache, len(order), read_blocks, options.image_size, desc=f"preprocess {source}")
    all_names, all_levels = list(levels), list(levels.values())
    all_classes = classes[order]
    names = list(options.factors)
    factor_levels = [levels[name] for name in names]
    factors = all_classes[:, [all_names.index(name) for name in names]]
    scores = class_scores(factors, factor_levels)
    info = {
        "description": description,
        "file": str(path),
        "cache_file": str(cache),
        "images": len(order),
        "order": f"seeded random order (seed {seed})" + (f", first {options.max_images} of {n_source}"
                                                          if options.max_images else ""),
        "factor_levels": dict(zip(names, factor_levels)),
        "skipped_images": 0,
    }
    plan = plan_correlation(options, all_names, default_pairs)
    weights = None
    if plan is not None:
        weights = plan.probabilities(all_classes, all_levels)
        info.update(plan.describe(all_classes, all_levels, weights))
    dataset = ImageDataset(images=images, attributes=names, factors=factors, factor_names=names,
                           factor_levels=factor_levels, attribute_scores=scores,
                           true_impact=true_impact(scores, weights=weights), sample_weights=weights, info=info)
    # The images are the grid (or a uniform subset of it): drawn uniformly, their factors are
    # independent whatever the training weights.
    dataset.independent_sample = lambda n, seed: (dataset, uniform_rows(len(dataset), n, seed))
    return dataset


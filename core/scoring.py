"""Oracle scores of a run's images, through the score cache.

Cached scores are reused and only the missing image-attribute pairs are asked; each scored batch
is committed at once, so a killed run loses at most the batch in flight.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gem.interfaces import ImageDataset, RelationOracle
from gem.recipe import Recipe
from gem.score_cache import ScoreCache, image_hash
from gem.progress import progress

__all__ = ["score_images", "score_with_cache", "score_summary"]


def score_images(oracle: RelationOracle, dataset: ImageDataset, indices: np.ndarray, batch_size: int,
                 cache: Optional[ScoreCache] = None, show_progress: bool = True,
                 accelerator: Any = None) -> tuple[np.ndarray, dict[str, int]]:
    """Oracle scores (len(indices), n), NaN where the oracle gave no valid score.

    With a cache (and an oracle that has a ``cache_key``) cached scores are reused and only the
    missing image-attribute pairs are asked; each scored batch is committed at once.
    With an accelerator of N processes, process k asks every N-th missing image from k on, and
    the results are gathered, so N processes make the same requests as one.
    Returns the scores and counters (``cache_hits``, ``images_asked``; summed over processes).
    """
    processes = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    attributes = list(dataset.attributes)
    scores = np.full((len(indices), len(attributes)), np.nan)
    key = getattr(oracle, "cache_key", "") if cache is not None else ""
    hashes = [image_hash(dataset.images[i]) for i in indices] if key else []
    if key:
        scores[:] = cache.get(key, hashes, attributes)
    cache_hits = int((~np.isnan(scores)).sum())
    # Ask each image only for what is missing; images missing the same attributes go together.
    groups: dict[tuple[int, ...], list[int]] = {}
    for row in np.flatnonzero(np.isnan(scores).any(axis=1)):
        groups.setdefault(tuple(np.flatnonzero(np.isnan(scores[row]))), []).append(int(row))
    groups = {cols: rows[rank::processes] for cols, rows in groups.items()}
    asked = sum(len(rows) for rows in groups.values())
    answered: list[tuple[np.ndarray, tuple[int, ...], np.ndarray]] = []
    with progress(asked, "score", unit="img", disable=not show_progress) as bar:
        for cols, rows in groups.items():
            names = [attributes[j] for j in cols]
            for start in range(0, len(rows), batch_size):
                chunk = np.asarray(rows[start:start + batch_size])
                result = np.asarray(oracle.score(np.asarray(dataset.images[indices[chunk]]), indices[chunk], names),
                                    dtype=float)
                if result.shape != (len(chunk), len(names)):
                    raise ValueError(f"oracle returned scores of shape {result.shape}, expected {(len(chunk), len(names))}")
                bad = ~np.isnan(result) & ((result < 0) | (result > 5))
                if bad.any():
                    i, j = np.argwhere(bad)[0]
                    raise ValueError(f"oracle returned {result[i, j]} for {names[j]!r} of image {indices[chunk][i]}; "
                                     "scores must be in 0..5 or NaN for missing")
                scores[np.ix_(chunk, cols)] = result
                answered.append((chunk, cols, result))
                if key:
                    cache.put(key, [hashes[r] for r in chunk], names, result)
                bar.update(len(chunk))
    if processes > 1:
        from accelerate.utils import gather_object

        for chunk, cols, result in gather_object(answered):
            scores[np.ix_(chunk, cols)] = result
        asked = int(sum(gather_object([asked])))
    return scores, {"cache_hits": cache_hits, "images_asked": asked}


def score_with_cache(oracle: RelationOracle, dataset: ImageDataset, indices: np.ndarray, recipe: Recipe,
                     show_progress: bool = True,
                     accelerator: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`score_images` through ``<cache_dir>/oracle_scores.sqlite`` (unless ``scoring.cache``
    is off); closes the oracle and the cache, and merges the oracle's own counters (summed over
    processes when ``accelerator`` shards the scoring)."""
    cache = None
    if recipe.scoring.cache:
        # The main process creates the file and switches it to WAL first: two processes doing
        # that at once get "database is locked" at once, without waiting for the busy timeout.
        with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
            cache = ScoreCache(Path(recipe.cache_dir) / "oracle_scores.sqlite")
    try:
        scores, counts = score_images(oracle, dataset, indices, recipe.scoring.batch_size, cache, show_progress,
                                      accelerator)
        stats = getattr(oracle, "stats", dict)()
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            totals: dict[str, Any] = {}
            for part in gather_object([stats]):
                for k, v in part.items():
                    totals[k] = totals.get(k, 0) + v if isinstance(v, (int, float)) else v
            stats = totals
        return scores, {**counts, **stats}
    finally:
        getattr(oracle, "close", lambda: None)()
        if cache is not None:
            cache.close()


def score_summary(scores: np.ndarray) -> dict[str, Any]:
    """Counts of a score matrix for metrics.json: images, missing scores, images with a missing
    score, and the rate of images whose every score is 0."""
    complete = ~np.isnan(scores).any(axis=1)
    return {"images_scored": int(len(scores)), "missing_scores": int(np.isnan(scores).sum()),
            "images_with_missing": int((~complete).sum()),
            "all_zero_rate": float((np.nan_to_num(scores, nan=1) == 0).all(axis=1).mean()) if len(scores) else 0.0}

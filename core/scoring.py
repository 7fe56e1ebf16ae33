"""Oracle scores of a run's images, through the score cache.

Cached scores are reused and only the missing image-attribute pairs are asked; answers are
committed as they arrive, so a killed run loses at most the requests in flight.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gem.errors import GemError
from gem.interfaces import ImageDataset, RelationOracle, ScoreRequest
from gem.recipe import Recipe
from gem.score_cache import ScoreCache, image_hash
from gem.progress import logger, progress

__all__ = ["score_images", "score_with_cache", "score_summary", "check_missing", "MissingScoresError",
           "scoring_plan", "format_estimate", "pending_asks"]


class MissingScoresError(GemError, RuntimeError):
    """More scores are missing than ``scoring.max_missing`` allows."""


def score_images(oracle: RelationOracle, dataset: ImageDataset, indices: np.ndarray, batch_size: int,
                 cache: Optional[ScoreCache] = None, show_progress: bool = True,
                 accelerator: Any = None) -> tuple[np.ndarray, dict[str, int]]:
    """Oracle scores (len(indices), n), NaN where the oracle gave no valid score.

    With a cache (and an oracle that has a ``cache_key``) cached scores are reused and only the
    missing image-attribute pairs are asked. Images stream through
    :meth:`~gem.interfaces.RelationOracle.score_stream`; each answer is committed to the
    cache as it arrives, so a killed run loses only the requests in flight.
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
    asks = pending_asks(scores, rank, processes)
    columns = dict(asks)
    estimate = getattr(oracle, "estimate", None)
    if asks and estimate is not None and getattr(oracle, "options", None) is not None:
        logger.info("scores: " + _estimate_line(estimate, oracle.options, dataset, indices, asks))
    requests = (ScoreRequest(row, np.asarray(dataset.images[indices[row]]), int(indices[row]),
                             tuple(attributes[j] for j in cols)) for row, cols in asks)
    answered: list[tuple[int, tuple[int, ...], np.ndarray]] = []
    pending: list[tuple[int, tuple[int, ...], np.ndarray]] = []

    def commit() -> None:
        if key and pending:
            by_columns: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
            for row, cols, values in pending:
                by_columns.setdefault(cols, []).append((row, values))
            for cols, items in by_columns.items():
                cache.put(key, [hashes[row] for row, _ in items], [attributes[j] for j in cols],
                          np.stack([values for _, values in items]))
        pending.clear()

    with progress(len(asks), "score", unit="img", disable=not show_progress) as bar:
        try:
            # An oracle that only has score() (duck-typed, not a RelationOracle) gets the batching default.
            stream = getattr(oracle, "score_stream", None) or partial(RelationOracle.score_stream, oracle)
            for row, values in stream(requests, batch_size):
                cols = columns[row]
                values = np.asarray(values, dtype=float)
                if values.shape != (len(cols),):
                    raise ValueError(f"oracle returned {values.shape[0] if values.ndim else 0} scores for image "
                                     f"{indices[row]}, expected {len(cols)}")
                bad = ~np.isnan(values) & ((values < 0) | (values > 5))
                if bad.any():
                    j = int(np.flatnonzero(bad)[0])
                    raise ValueError(f"oracle returned {values[j]} for {attributes[cols[j]]!r} of image "
                                     f"{indices[row]}; scores must be in 0..5 or NaN for missing")
                scores[row, list(cols)] = values
                answered.append((row, cols, values))
                pending.append((row, cols, values))
                commit()
                bar.update(1)
        finally:
            commit()
    asked = len(asks)
    if processes > 1:
        from accelerate.utils import gather_object

        for row, cols, values in gather_object(answered):
            scores[row, list(cols)] = values
        asked = int(sum(gather_object([asked])))
    return scores, {"cache_hits": cache_hits, "images_asked": asked}


def pending_asks(scores: np.ndarray, rank: int = 0, processes: int = 1) -> list[tuple[int, tuple[int, ...]]]:
    """(row, columns) of every image with missing scores, asking only what is missing; images
    missing the same attributes go together; process ``rank`` of ``processes`` takes every N-th."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row in np.flatnonzero(np.isnan(scores).any(axis=1)):
        groups.setdefault(tuple(int(j) for j in np.flatnonzero(np.isnan(scores[row]))), []).append(int(row))
    return [(row, cols) for cols, rows in groups.items() for row in rows[rank::processes]]


def format_estimate(estimate: dict[str, Any]) -> str:
    """One line: requests, tokens and (with a price) the cost of what an oracle is about to ask."""
    line = (f"{estimate['requests']:,} requests to {estimate['model']}, about {estimate['input_tokens']:,} input "
            f"and {estimate['output_tokens']:,} output tokens")
    if estimate.get("cost") is not None:
        price_in, price_out = estimate["prices"]
        line += f", about ${estimate['cost']:,.2f} at ${price_in:g} / ${price_out:g} per million input / output tokens"
    else:
        line += " (set oracle.price_per_million_tokens for the cost)"
    return line + "; retries and hedged requests come on top"


def _estimate_line(estimate: Any, options: Any, dataset: ImageDataset, indices: np.ndarray,
                   asks: list[tuple[int, tuple[int, ...]]]) -> str:
    """:func:`format_estimate` of an oracle's ``estimate(options, asks)`` for these missing scores."""
    shape = tuple(np.asarray(dataset.images[indices[0]]).shape[:2])
    attributes = list(dataset.attributes)
    return format_estimate(estimate(options, [(shape, [attributes[j] for j in cols]) for _, cols in asks]))


def scoring_plan(recipe: Recipe, registry: Any, dataset: ImageDataset, indices: np.ndarray) -> str:
    """What scoring ``indices`` with the recipe's oracle would ask, sending nothing and building
    no oracle (no API key or model needed): cached scores, requests, tokens and cost."""
    name = recipe.plugin_name("oracle")
    registration = registry.get("oracle", name)
    options = recipe.plugin_options["oracle"]
    attributes = list(dataset.attributes)
    scores = np.full((len(indices), len(attributes)), np.nan)
    key_for = getattr(registration.factory, "key_for", None)
    path = Path(recipe.cache_dir) / "oracle_scores.sqlite"
    if recipe.scoring.cache and key_for is not None and path.is_file():
        with ScoreCache(path) as cache:
            scores[:] = cache.get(key_for(options), [image_hash(dataset.images[i]) for i in indices], attributes)
    asks = pending_asks(scores)
    cached = int((~np.isnan(scores)).sum())
    line = (f"oracle {name!r}: {len(indices):,} images x {len(attributes)} attributes, {cached:,} of "
            f"{scores.size:,} scores cached, {len(asks):,} images to ask")
    estimate = getattr(registration.factory, "estimate", None)
    if estimate is not None and asks:
        line += ": " + _estimate_line(estimate, options, dataset, indices, asks)
    elif asks:
        line += " (a local oracle: no requests are paid for)"
    return line


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


def check_missing(scores: np.ndarray, attributes: list[str], max_missing: float, cache_path: Optional[Path] = None) -> None:
    """Say on the console how many scores each attribute misses, and stop when more than
    ``max_missing`` of all scores are missing (:class:`MissingScoresError`)."""
    missing = np.isnan(scores).sum(axis=0)
    if not missing.any():
        return
    fraction = float(missing.sum()) / scores.size
    per_attribute = ", ".join(f"{a} {int(m)}" for a, m in zip(attributes, missing) if m)
    logger.warning(f"scores: {int(missing.sum()):,} of {scores.size:,} scores are missing ({fraction:.1%}): "
                f"{per_attribute} (of {len(scores):,} images each)")
    if fraction > max_missing:
        kept = (f"the scores that arrived are kept in {cache_path}, so a re-run asks only for the missing ones"
                if cache_path is not None else "scoring.cache is off, so a re-run asks for every score again")
        raise MissingScoresError(
            f"{fraction:.1%} of the oracle's scores are missing, more than scoring.max_missing={max_missing:g}; "
            f"{kept}. Look at the oracle's replies (gem oracle-eval shows accuracy and missing answers per "
            f"attribute), or raise scoring.max_missing to train with what there is")

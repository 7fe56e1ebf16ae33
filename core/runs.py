"""Reading a finished run folder back: recipe, data set, trained models, scores and impact.

:func:`load_run` rebuilds everything a run used from ``recipe.yaml`` through the same plugins
(data set, extractor, graph learner), loads the weights of ``model.pt`` into them and recovers the
run's split of the data set with :func:`split_indices`, the one function the pipeline also uses,
so an evaluation after the fact sees exactly the images the run held out and scored.

Relative paths in the recipe (``cache_dir``, a data set's ``root``) are resolved against the
current directory, as they were when the run started: run ``gem eval`` from the same place.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import yaml

from gem.interfaces import BuildContext, Extractor, ImageDataset
from gem.plugins import Registry, make_plugin_manager
from gem.recipe import Recipe, validate_recipe
from gem.relations import RelationModel

__all__ = ["RUN_FILES", "RunFolderError", "LoadedRun", "split_indices", "read_scores", "read_impact", "load_run"]

#: What a finished run folder must hold for :func:`load_run`.
RUN_FILES = ("recipe.yaml", "model.pt", "scores.csv", "impact.json")


class RunFolderError(FileNotFoundError):
    """The folder is not a finished gem run; the message names what is missing."""


def split_indices(recipe: Recipe, dataset: ImageDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The run's split of the data set: ``(train_idx, eval_idx, scored_idx)``.

    * ``eval_idx``: the last ``min(evaluation.n_images, N // 5)`` images, held out of training;
    * ``train_idx``: every image before them;
    * ``scored_idx``: the images the oracle scores: the first ``scoring.n_images`` training
      images, or, when the data set has ``sample_weights`` (correlated sampling), as many drawn
      with replacement from the training images in proportion to the weights with
      ``numpy.random.default_rng(recipe.seed)``, sorted.
    """
    n_eval = min(recipe.evaluation.n_images, len(dataset) // 5)
    train_idx = np.arange(len(dataset) - n_eval)
    eval_idx = np.arange(len(dataset) - n_eval, len(dataset))
    n_scored = min(recipe.scoring.n_images, len(train_idx))
    if dataset.sample_weights is None:
        scored_idx = np.arange(n_scored)
    else:
        # Correlated sampling: the oracle sees images drawn as training draws them.
        weights = np.asarray(dataset.sample_weights, dtype=float)[train_idx]
        rng = np.random.default_rng(recipe.seed)
        scored_idx = np.sort(rng.choice(train_idx, size=n_scored, replace=True, p=weights / weights.sum()))
    return train_idx, eval_idx, scored_idx


@dataclass
class LoadedRun:
    """Everything :func:`load_run` rebuilt from a run folder.

    ``extractor`` and ``relation`` are in eval mode on ``device``; ``scores`` are the rows of
    scores.csv (NaN = missing) for the images ``score_indices`` (the indices scores.csv names,
    equal to ``scored_idx`` unless the folder was edited; ``notes`` says when they differ);
    ``impact`` is impact.json with its matrices as float arrays (None where absent);
    ``metrics`` is metrics.json ({} when the run has none yet).
    """

    run_dir: Path
    recipe: Recipe
    registry: Registry
    dataset: ImageDataset
    extractor: Extractor
    relation: RelationModel
    attributes: list[str]
    train_idx: np.ndarray
    eval_idx: np.ndarray
    scored_idx: np.ndarray
    score_indices: np.ndarray
    scores: np.ndarray
    impact: dict[str, Any]
    metrics: dict[str, Any]
    device: torch.device
    context: BuildContext
    notes: list[str] = field(default_factory=list)

    @property
    def learned_adjacency(self) -> np.ndarray:
        """The trained relation graph A (n, n) in attribute order."""
        with torch.no_grad():
            return self.relation.adjacency().detach().float().cpu().numpy()


def _check_run_folder(run_dir: Path) -> None:
    if not run_dir.exists():
        raise RunFolderError(f"run folder {str(run_dir)!r} does not exist")
    if not run_dir.is_dir():
        raise RunFolderError(f"{str(run_dir)!r} is not a folder; expected a gem run folder")
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    if missing:
        raise RunFolderError(f"{str(run_dir)!r} is not a finished gem run: {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} missing (a run folder holds "
                             f"{', '.join(RUN_FILES)})")


def read_scores(path: Union[str, Path], attributes: Optional[list[str]] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, scores)`` from a scores.csv; empty cells are NaN. Checks the header."""
    path = Path(path)
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or not rows[0] or rows[0][0] != "image":
        raise ValueError(f"{path}: not a gem scores file (the header must start with 'image')")
    header = rows[0][1:]
    if attributes is not None and list(header) != list(attributes):
        raise ValueError(f"{path}: columns {header} differ from the data set's attributes {list(attributes)}")
    body = [row for row in rows[1:] if row]
    indices = np.array([int(row[0]) for row in body], dtype=np.int64)
    scores = np.full((len(body), len(header)), np.nan)
    for r, row in enumerate(body):
        if len(row) != len(header) + 1:
            raise ValueError(f"{path}: row {r + 2} has {len(row)} cells, expected {len(header) + 1}")
        for c, cell in enumerate(row[1:]):
            if cell.strip():
                scores[r, c] = float(cell)
    return indices, scores


_MATRICES = ("oracle_impact", "ci_low", "ci_high", "learned_adjacency", "true_impact")


def read_impact(path: Union[str, Path]) -> dict[str, Any]:
    """impact.json with its matrices as float arrays (null cells NaN) and None where absent."""
    impact = json.loads(Path(path).read_text())
    for key in _MATRICES:
        value = impact.get(key)
        impact[key] = None if value is None else np.array(
            [[np.nan if v is None else v for v in row] for row in value], dtype=float)
    impact.setdefault("notes", [])
    return impact


def _default_accelerator(recipe: Recipe):
    from accelerate import Accelerator

    try:
        return Accelerator(cpu=recipe.training.cpu, mixed_precision=recipe.training.mixed_precision)
    except ValueError:
        # accelerate keeps one state per process: reuse the one already set up.
        return Accelerator()


def _load_state(module: torch.nn.Module, state: Any, what: str, path: Path) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"{path}: the {what!r} entry is not a state dict")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"{path}: the saved {what} weights do not fit the {what} recipe.yaml builds "
                         f"({' '.join(first[:3])})") from None


def load_run(run_dir: Union[str, Path], registry: Optional[Registry] = None, *, accelerator: Any = None,
             device: Any = None) -> LoadedRun:
    """Rebuild a finished run from its folder.

    Parameters
    ----------
    run_dir : the run folder (needs recipe.yaml, model.pt, scores.csv and impact.json)
    registry : plugins to build with; default ``Registry(make_plugin_manager())``
    accelerator : handed to plugins in the BuildContext; default an ``Accelerator`` set up as the
        recipe's ``training.cpu`` / ``mixed_precision`` say (or the process's existing one)
    device : where the models go; default the accelerator's device

    Raises
    ------
    RunFolderError (a FileNotFoundError) naming the missing file; ValueError when the recipe,
    weights and data set do not fit together.
    """
    run_dir = Path(run_dir)
    _check_run_folder(run_dir)
    registry = registry if registry is not None else Registry(make_plugin_manager())
    data = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{run_dir / 'recipe.yaml'}: not a recipe mapping")
    recipe = validate_recipe(data, registry)
    acc = accelerator if accelerator is not None else _default_accelerator(recipe)
    dev = torch.device(device) if device is not None else torch.device(getattr(acc, "device", "cpu"))
    context = BuildContext(seed=recipe.seed, run_dir=run_dir, cache_dir=Path(recipe.cache_dir), accelerator=acc)
    context.cache_dir.mkdir(parents=True, exist_ok=True)

    def build(stage: str) -> Any:
        return registry.get(stage, recipe.plugin_name(stage)).build(recipe.plugin_options[stage], context)

    dataset: ImageDataset = build("dataset")
    if len(dataset) == 0 or not dataset.attributes:
        raise ValueError(f"data set {recipe.plugin_name('dataset')!r} has no images or no attributes")
    context.dataset, context.attributes = dataset, list(dataset.attributes)
    attributes = list(dataset.attributes)
    train_idx, eval_idx, scored_idx = split_indices(recipe, dataset)

    path = run_dir / "model.pt"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path}: cannot be read as a gem model ({type(exc).__name__}: {exc})") from None
    if not isinstance(saved, dict) or not {"extractor", "relation"} <= set(saved):
        raise ValueError(f"{path}: expected a dict with 'extractor' and 'relation' weights")
    saved_attributes = list(saved.get("attributes") or attributes)
    if saved_attributes != attributes:
        raise ValueError(f"{path}: the model was trained on attributes {saved_attributes}, but the data set "
                         f"recipe.yaml builds has {attributes}")

    impact = read_impact(run_dir / "impact.json")
    extractor: Extractor = build("extractor")
    graph = build("graph")
    if impact["oracle_impact"] is not None:
        graph.set_anchor(torch.as_tensor(impact["oracle_impact"], dtype=torch.float32))
    relation = RelationModel(graph, len(attributes))
    _load_state(extractor, saved["extractor"], "extractor", path)
    _load_state(relation, saved["relation"], "relation", path)
    extractor.to(dev).eval()
    relation.to(dev).eval()

    notes: list[str] = []
    score_indices, scores = read_scores(run_dir / "scores.csv", attributes)
    if not np.array_equal(score_indices, scored_idx):
        notes.append(f"scores.csv names {len(score_indices)} images that differ from the {len(scored_idx)} the "
                     "recipe's split selects; its own image indices are used")
    if len(score_indices) and (score_indices.min() < 0 or score_indices.max() >= len(dataset)):
        raise ValueError(f"{run_dir / 'scores.csv'}: image indices outside the data set's 0..{len(dataset) - 1}")
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return LoadedRun(run_dir=run_dir, recipe=recipe, registry=registry, dataset=dataset, extractor=extractor,
                     relation=relation, attributes=attributes, train_idx=train_idx, eval_idx=eval_idx,
                     scored_idx=scored_idx, score_indices=score_indices, scores=scores, impact=impact,
                     metrics=metrics, device=dev, context=context, notes=notes)

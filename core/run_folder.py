"""A trained run, in memory or read back from its folder, and the files that hold it.

:class:`TrainedRun` is what evaluation takes: ``gem-run`` makes one from the models it has just
trained, :func:`load_run` rebuilds one from a run folder through the same plugins (data set,
extractor, graph learner) and the same split (:meth:`gem.context.RunContext.split`), so an
evaluation after the fact sees exactly the models and images the run had. The scores.csv and
impact.json readers and writers live here too, so each file has one definition.

Relative paths in the recipe (``cache_dir``, a data set's ``root``) are resolved against the
current directory, as they were when the run started: run ``gem eval`` from the same place.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import yaml

from gem.context import RunContext, Split
from gem.errors import GemError, RunFolderContentError
from gem.interfaces import Extractor, ImageDataset, Ranking
from gem.io import atomic_write_text, write_json
from gem.plugins import Registry, make_plugin_manager
from gem.recipe import Recipe, validate_recipe
from gem.relations import RelationModel

__all__ = ["RUN_FILES", "RunFolderError", "TrainedRun", "read_scores", "write_scores", "read_impact",
           "impact_record", "write_impact", "load_run"]
#: What a finished run folder must hold for :func:`load_run`.
RUN_FILES = ("recipe.yaml", "model.pt", "scores.csv", "impact.json")


class RunFolderError(GemError, FileNotFoundError):
    """The folder is not a finished gem run; the message names what is missing."""


@dataclass
class TrainedRun:
    """A trained extractor and relation graph with the data, split and scores they came from.

    ``scores`` are the oracle's scores (NaN = missing) of the images ``score_indices`` (equal to
    ``split.scored`` unless a run folder was edited; ``notes`` says when they differ);
    ``impact`` is :func:`impact_record`'s dict (oracle S with its interval, learned A, true
    impact, as float arrays or None).
    """

    context: RunContext
    dataset: ImageDataset
    extractor: Extractor
    relation: RelationModel
    split: Split
    score_indices: np.ndarray
    scores: np.ndarray
    impact: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.context.run_dir

    @property
    def recipe(self) -> Recipe:
        return self.context.recipe

    @property
    def device(self) -> torch.device:
        return torch.device(self.context.device)

    @property
    def attributes(self) -> list[str]:
        return list(self.dataset.attributes)

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


def write_scores(path: Union[str, Path], indices: np.ndarray, attributes: Sequence[str], scores: np.ndarray,
                 labels: Optional[np.ndarray] = None) -> Path:
    """Write a scores.csv: one row per image, its index then its score of each attribute (empty
    for missing, written so that it reads back as the same float); with ``labels`` also each
    attribute's label, in columns ``"<attribute> (label)"``."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", *attributes, *([f"{a} (label)" for a in attributes] if labels is not None else [])])
    for r, (index, row) in enumerate(zip(indices, scores)):
        truth = [int(v) for v in labels[r]] if labels is not None else []
        writer.writerow([int(index), *(_score_cell(v) for v in row), *truth])
    return atomic_write_text(Path(path), buf.getvalue())


def _score_cell(value: float) -> str:
    if np.isnan(value):
        return ""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def read_scores(path: Union[str, Path], attributes: Optional[list[str]] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, scores)`` from a scores.csv; empty cells are NaN. Checks the header."""
    path = Path(path)
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or not rows[0] or rows[0][0] != "image":
        raise RunFolderContentError(f"{path}: not a gem scores file (the header must start with 'image')")
    header = [h for h in rows[0][1:] if not h.endswith(" (label)")]
    if attributes is not None and list(header) != list(attributes):
        raise RunFolderContentError(f"{path}: columns {header} differ from the data set's attributes "
                                    f"{list(attributes)}")
    width = len(rows[0])
    body = [row for row in rows[1:] if row]
    indices = np.array([int(row[0]) for row in body], dtype=np.int64)
    scores = np.full((len(body), len(header)), np.nan)
    for r, row in enumerate(body):
        if len(row) != width:
            raise RunFolderContentError(f"{path}: row {r + 2} has {len(row)} cells, expected {width}")
        for c, cell in enumerate(row[1:1 + len(header)]):
            if cell.strip():
                scores[r, c] = float(cell)
    return indices, scores


_MATRICES = ("oracle_impact", "ci_low", "ci_high", "learned_adjacency", "true_impact")


def impact_record(attributes: Sequence[str], ranking: Ranking, learned: np.ndarray,
                  true_impact: Optional[np.ndarray]) -> dict[str, Any]:
    """What impact.json holds: the oracle's S with its interval, the learned A and the true impact."""
    return {"attributes": list(attributes), "oracle_impact": ranking.impact, "ci_low": ranking.ci_low,
            "ci_high": ranking.ci_high, "learned_adjacency": learned, "true_impact": true_impact,
            "images_used": ranking.n_used, "notes": list(ranking.notes)}


def write_impact(run_dir: Path, impact: dict[str, Any]) -> None:
    """impact.json, and impact.csv with one row per edge (source, target) for spreadsheets."""
    write_json(run_dir / "impact.json", impact)
    attrs = impact["attributes"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["source", "target", "oracle_impact", "ci_low", "ci_high", "learned", "true"])
    for i, a in enumerate(attrs):
        for j, b in enumerate(attrs):
            cells = [np.nan if impact[key] is None else impact[key][i][j]
                     for key in ("oracle_impact", "ci_low", "ci_high", "learned_adjacency", "true_impact")]
            writer.writerow([a, b, *("" if np.isnan(c) else f"{c:.6f}" for c in cells)])
    atomic_write_text(run_dir / "impact.csv", buf.getvalue())


def read_impact(path: Union[str, Path]) -> dict[str, Any]:
    """impact.json with its matrices as float arrays (null cells NaN) and None where absent."""
    impact = json.loads(Path(path).read_text())
    for key in _MATRICES:
        value = impact.get(key)
        impact[key] = None if value is None else np.array(
            [[np.nan if v is None else v for v in row] for row in value], dtype=float)
    impact.setdefault("notes", [])
    return impact


def _load_state(module: torch.nn.Module, state: Any, what: str, path: Path) -> None:
    if not isinstance(state, dict):
        raise RunFolderContentError(f"{path}: the {what!r} entry is not a state dict")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise RunFolderContentError(f"{path}: the saved {what} weights do not fit the {what} recipe.yaml builds "
                                    f"({' '.join(first[:3])})") from None


def load_run(run_dir: Union[str, Path], registry: Optional[Registry] = None, *, accelerator: Any = None) -> TrainedRun:
    """Rebuild a finished run from its folder.

    Parameters
    ----------
    run_dir : the run folder (needs recipe.yaml, model.pt, scores.csv and impact.json)
    registry : plugins to build with; default ``Registry(make_plugin_manager())``
    accelerator : where the models go and what plugins receive; default one made as the recipe's
        ``training`` section says (:func:`gem.context.make_accelerator`)

    Raises
    ------
    RunFolderError (a FileNotFoundError) naming the missing file; RunFolderContentError (a
    ValueError) when the recipe, weights and data set do not fit together.
    """
    run_dir = Path(run_dir)
    _check_run_folder(run_dir)
    registry = registry if registry is not None else Registry(make_plugin_manager())
    data = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    if not isinstance(data, dict):
        raise RunFolderContentError(f"{run_dir / 'recipe.yaml'}: not a recipe mapping")
    context = RunContext.open(validate_recipe(data, registry), registry, run_dir, accelerator)
    dataset = context.load_dataset()
    attributes = list(dataset.attributes)
    split = context.split(dataset)

    path = run_dir / "model.pt"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise RunFolderContentError(f"{path}: cannot be read as a gem model ({type(exc).__name__}: {exc})") from None
    if not isinstance(saved, dict) or not {"extractor", "relation"} <= set(saved):
        raise RunFolderContentError(f"{path}: expected a dict with 'extractor' and 'relation' weights")
    saved_attributes = list(saved.get("attributes") or attributes)
    if saved_attributes != attributes:
        raise RunFolderContentError(f"{path}: the model was trained on attributes {saved_attributes}, but the "
                                    f"data set recipe.yaml builds has {attributes}")

    impact = read_impact(run_dir / "impact.json")
    extractor: Extractor = context.build("extractor")
    graph = context.build("graph")
    if impact["oracle_impact"] is not None:
        graph.set_anchor(torch.as_tensor(impact["oracle_impact"], dtype=torch.float32))
    relation = RelationModel(graph, len(attributes))
    _load_state(extractor, saved["extractor"], "extractor", path)
    _load_state(relation, saved["relation"], "relation", path)
    extractor.to(context.device).eval()
    relation.to(context.device).eval()

    notes: list[str] = []
    score_indices, scores = read_scores(run_dir / "scores.csv", attributes)
    if not np.array_equal(score_indices, split.scored):
        notes.append(f"scores.csv names {len(score_indices)} images that differ from the {len(split.scored)} the "
                     "recipe's split selects; its own image indices are used")
    if len(score_indices) and (score_indices.min() < 0 or score_indices.max() >= len(dataset)):
        raise RunFolderContentError(f"{run_dir / 'scores.csv'}: image indices outside the data set's "
                                    f"0..{len(dataset) - 1}")
    return TrainedRun(context=context, dataset=dataset, extractor=extractor, relation=relation, split=split,
                      score_indices=score_indices, scores=scores, impact=impact, notes=notes)

"""Live experiment tracking through accelerate's trackers (``training.log_with``).

A run logs every loss term as it trains (``loss/<term>``), the learned relation graph at the same
steps (``graph/<source>-><target>``) and, at its end, the evaluation's numbers
(``eval/<section>/<metric>``). TensorBoard writes into ``<run>/tracking/<recipe name>``
(``tensorboard --logdir <run>/tracking``); the hosted trackers (wandb, mlflow, ...) log where their
own configuration says.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from gem.errors import MissingDependencyError

__all__ = ["TRACKER_PACKAGES", "check_tracker_packages", "Tracking"]

#: accelerate's tracker names and the package each needs.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


def check_tracker_packages(names: Sequence[str]) -> None:
    """Raise :class:`MissingDependencyError` naming the package of the first tracker that is not installed."""
    for name in names:
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise MissingDependencyError(f"training.log_with: the {name!r} tracker needs the package {package!r}; "
                                         f"install it (pip install {package}) or remove {name!r} from log_with")


def _flat_numbers(data: Any, prefix: str) -> dict[str, float]:
    """Every finite int/float leaf of a nested mapping, keyed ``prefix/a/b``."""
    out: dict[str, float] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            out.update(_flat_numbers(value, f"{prefix}/{key}"))
    elif isinstance(data, (int, float, np.integer, np.floating)) and not isinstance(data, bool):
        if np.isfinite(float(data)):
            out[prefix] = float(data)
    return out


def _config(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe as the flat scalar mapping trackers accept as hyperparameters."""
    out: dict[str, Any] = {}

    def walk(data: Any, prefix: str) -> None:
        if isinstance(data, Mapping):
            for key, value in data.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(data, (bool, int, float, str)):
            out[prefix] = data
        elif data is not None:
            out[prefix] = str(data)

    walk(recipe, "")
    return out


class Tracking:
    """The trackers of one run, on the accelerator that trains it (only the main process logs)."""

    def __init__(self, accelerator: Any, names: Sequence[str], run_dir: Path, project: str,
                 recipe: Mapping[str, Any]):
        self.accelerator = accelerator
        self.active = bool(names)
        if not self.active:
            return
        check_tracker_packages(names)
        logging_dir = str(Path(run_dir) / "tracking")
        config = accelerator.project_configuration
        config.project_dir = config.logging_dir = logging_dir
        accelerator.init_trackers(project, config=_config(recipe))

    def log_losses(self, record: Mapping[str, float]) -> None:
        """One logged record of :attr:`gem.training.Trainer.history` (``step`` and loss terms)."""
        if self.active:
            step = int(record["step"])
            self.accelerator.log({f"loss/{k}": float(v) for k, v in record.items() if k != "step"}, step=step)

    def log_graph(self, adjacency: Any, attributes: Sequence[str], step: int) -> None:
        """Every entry of the learned graph A (source -> target)."""
        if self.active:
            a = np.asarray(adjacency, dtype=float)
            self.accelerator.log({f"graph/{attributes[i]}->{attributes[j]}": float(a[i, j])
                                  for i in range(len(attributes)) for j in range(len(attributes))}, step=int(step))

    def log_metrics(self, metrics: Mapping[str, Any], step: int,
                    sections: Optional[Sequence[str]] = None) -> None:
        """The numbers of an evaluation (a metrics.json mapping), ``eval/<section>/...``."""
        if self.active:
            chosen = {k: v for k, v in metrics.items() if sections is None or k in sections}
            values = _flat_numbers(chosen, "eval")
            if values:
                self.accelerator.log(values, step=int(step))

    def close(self) -> None:
        """Flush and close the trackers (not the process group, which the run still needs)."""
        if self.active:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.active = False

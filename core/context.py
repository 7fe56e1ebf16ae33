"""Everything a command needs to build a run's stages: the recipe, the plugins, the accelerator
and the folders, with the data set and its split.

``gem-run``, ``gem eval``, ``gem compare`` and ``gem oracle-eval`` all go through
:class:`RunContext`, so a stage is built, and a data set split, the same way everywhere.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from gem.errors import DataError
from gem.interfaces import BuildContext, ImageDataset
from gem.plugins import Registry
from gem.recipe import Recipe, TrainingOptions
from gem.progress import logger

__all__ = ["DataError", "Split", "RunContext", "make_accelerator", "leave_process_group", "split_indices",
           "timestamped_folder"]


class Split(NamedTuple):
    """Image indices of a run: trained on, held out for evaluation, scored by the oracle."""

    train: np.ndarray
    held_out: np.ndarray
    scored: np.ndarray


def make_accelerator(options: TrainingOptions) -> Any:
    """The accelerator of a run: device, mixed precision and gradient accumulation from the recipe.

    Batches are split across processes (``split_batches``): each of N processes trains on
    ``batch_size / N`` images of every batch, so a recipe means the same optimisation on one
    process or many. accelerate keeps one state per process; when one with other settings
    exists already (several commands in one Python process), that one is reused.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    # Trackers need a logging folder when the accelerator is made; gem.tracking points it at the run.
    tracking = dict(log_with=list(options.log_with), project_dir=".") if options.log_with else {}
    try:
        return Accelerator(cpu=options.cpu, mixed_precision=options.mixed_precision,
                           gradient_accumulation_steps=options.gradient_accumulation_steps,
                           dataloader_config=DataLoaderConfiguration(split_batches=True), **tracking)
    except ValueError:
        return Accelerator(**tracking)


def leave_process_group(accelerator: Any, exit_code: int = 0) -> None:
    """End this process's part in a multi-process job: destroy the process group, flush the output
    and exit at once. A normal interpreter shutdown after gloo's process group sometimes aborts
    ("terminate called without an active exception": a C++ thread still joinable at exit), which
    would fail a job whose work is done and written."""
    accelerator.end_training()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def timestamped_folder(parent: Path, name: str) -> Path:
    """``parent/<name>-<YYYYmmdd-HHMMSS>``, with ``-1``, ``-2`` ... appended until no such folder exists."""
    base = Path(parent) / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    out, k = base, 1
    while out.exists():
        out, k = Path(f"{base}-{k}"), k + 1
    return out


def split_indices(recipe: Recipe, dataset: ImageDataset) -> Split:
    """The run's split of the data set.

    * ``held_out``: the last ``min(evaluation.n_images, N // 5)`` images, never trained on;
    * ``train``: every image before them;
    * ``scored``: the images the oracle scores: the first ``scoring.n_images`` training images,
      or, when the data set has ``sample_weights`` (correlated sampling), as many drawn with
      replacement from the training images in proportion to the weights with
      ``numpy.random.default_rng(recipe.seed)``, sorted.
    """
    n_eval = min(recipe.evaluation.n_images, len(dataset) // 5)
    train = np.arange(len(dataset) - n_eval)
    held_out = np.arange(len(dataset) - n_eval, len(dataset))
    n_scored = min(recipe.scoring.n_images, len(train))
    if dataset.sample_weights is None:
        scored = np.arange(n_scored)
    else:
        # Correlated sampling: the oracle sees images drawn as training draws them.
        weights = np.asarray(dataset.sample_weights, dtype=float)[train]
        rng = np.random.default_rng(recipe.seed)
        scored = np.sort(rng.choice(train, size=n_scored, replace=True, p=weights / weights.sum()))
    return Split(train, held_out, scored)


def auto_threads() -> tuple[int, str]:
    """torch threads for ``training.threads: 0`` (unless ``OMP_NUM_THREADS`` is set) and the reason,
    in words: the cores this process may use less the ones other processes keep busy (the 1-minute
    load average), at least one.

    More threads than free cores make every thread wait for the slowest (several times slower
    steps); with ``OMP_WAIT_POLICY=PASSIVE`` (gem's commands set it unless you do) waiting
    threads sleep instead of spinning, so a wrong guess costs little."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        busy = 0.0
    threads = max(1, min(cores, int(cores - busy + 0.5)))
    return threads, f"{cores} core(s), load {busy:.1f}"


@dataclass
class RunContext:
    """A validated recipe with its plugins, accelerator and folders.

    Make one with :meth:`open`; then :meth:`build` any stage's plugin and :meth:`load_dataset`.
    ``plugin_context`` is the :class:`gem.interfaces.BuildContext` every plugin factory receives;
    it learns the data set and its attributes when :meth:`load_dataset` runs.
    """

    recipe: Recipe
    registry: Registry
    accelerator: Any
    run_dir: Path
    plugin_context: BuildContext

    @classmethod
    def open(cls, recipe: Recipe, registry: Registry, run_dir: Path, accelerator: Any = None) -> "RunContext":
        """Apply the recipe's thread count, make (or take) the accelerator, create the cache folder
        and tell the plugins the recipe (the ``gem_configure`` hook)."""
        import torch

        if recipe.training.threads:
            torch.set_num_threads(recipe.training.threads)
        elif not os.environ.get("OMP_NUM_THREADS"):  # a thread count the user set in the environment stays
            threads, why = auto_threads()
            torch.set_num_threads(threads)
            logger.info(f"threads: {threads} ({why}; set training.threads to choose)")
        registry.pm.hook.gem_configure.call_historic(kwargs={"recipe": recipe.to_dict()})
        acc = accelerator if accelerator is not None else make_accelerator(recipe.training)
        run_dir = Path(run_dir)
        plugin_context = BuildContext(seed=recipe.seed, run_dir=run_dir, cache_dir=Path(recipe.cache_dir),
                                      accelerator=acc)
        plugin_context.cache_dir.mkdir(parents=True, exist_ok=True)
        return cls(recipe, registry, acc, run_dir, plugin_context)

    @property
    def device(self) -> Any:
        return self.accelerator.device

    def build(self, stage: str, **option_changes: Any) -> Any:
        """The recipe's plugin of ``stage``, built from its options (with ``option_changes`` applied)."""
        options = self.recipe.plugin_options[stage]
        if option_changes:
            options = replace(options, **option_changes)
        return self.registry.get(stage, self.recipe.plugin_name(stage)).build(options, self.plugin_context)

    def load_dataset(self) -> ImageDataset:
        """Build the recipe's data set (main process first, so its cache is made once) and check it."""
        with self.accelerator.main_process_first():
            dataset: ImageDataset = self.build("dataset")
        name = self.recipe.plugin_name("dataset")
        if len(dataset) == 0:
            raise DataError(f"data set {name!r} has no images")
        if not dataset.attributes:
            raise DataError(f"data set {name!r} names no attributes")
        self.plugin_context.dataset, self.plugin_context.attributes = dataset, list(dataset.attributes)
        return dataset

    def split(self, dataset: ImageDataset) -> Split:
        """:func:`split_indices` of this recipe."""
        return split_indices(self.recipe, dataset)

    def has_option(self, stage: str, name: str) -> bool:
        """Whether the recipe's plugin of ``stage`` has an option ``name``."""
        return name in getattr(self.recipe.plugin_options[stage], "__dataclass_fields__", {})

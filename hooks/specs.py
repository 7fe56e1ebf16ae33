"""The hook specifications: every hook gem calls, all prefixed ``gem_``.

Registration hooks receive ``register(name, factory, *, options=None, description="")``.
``factory(options, context)`` builds the plugin object for a run; ``options`` is a dataclass
type whose fields are the recipe keys the plugin accepts (the recipe validator reads it).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from gem.hooks import hookspec

Register = Callable[..., None]


@hookspec
def gem_register_datasets(register: Register) -> None:
    """Register data set factories (images plus optional ground-truth factors)."""


@hookspec
def gem_register_extractors(register: Register) -> None:
    """Register attribute extractors (the models that learn one latent per attribute)."""


@hookspec
def gem_register_oracles(register: Register) -> None:
    """Register relation oracles (score every attribute of an image 0-5)."""


@hookspec
def gem_register_rankers(register: Register) -> None:
    """Register rankers (turn an images x attributes score matrix into impact scores)."""


@hookspec
def gem_register_graph_learners(register: Register) -> None:
    """Register graph learners (refine the impact matrix into the relation graph A)."""


@hookspec(historic=True)
def gem_configure(recipe: Mapping[str, Any]) -> None:
    """Called once with the validated recipe before a run starts (loggers, trackers)."""


@hookspec
def gem_on_stage_end(stage: str, outputs: Mapping[str, Any]) -> None:
    """Called after each pipeline stage with what it produced (data, scores, ranks, train, report)."""

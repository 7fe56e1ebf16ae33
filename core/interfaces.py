"""What each pipeline stage hands to the next: the plugin base classes and their data.

Every plugin factory is called as ``factory(options, context)`` with the plugin's options
dataclass (filled from the recipe) and a :class:`BuildContext`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, NamedTuple, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn


@dataclass
class BuildContext:
    """What a plugin factory may use besides its own options."""

    seed: int
    run_dir: Path
    cache_dir: Path
    attributes: Sequence[str] = ()
    dataset: Optional["ImageDataset"] = None
    accelerator: Any = None


@dataclass
class ImageDataset:
    """Images plus whatever ground truth the source has.

    Attributes
    ----------
    images : np.ndarray
        uint8 array (N, H, W, 3); may be a read-only memmap of the preprocessing cache.
    attributes : list of str
        Names of the attributes GEM models, one latent dimension each.
    factors : np.ndarray or None
        int array (N, K) of ground-truth factor classes (0 .. levels-1), when known.
    factor_names : list of str
        Names of the K factors.
    factor_levels : list of int
        Number of classes of each factor.
    attribute_scores : np.ndarray or None
        int array (N, n) of true 0-5 scores of each attribute (what a perfect oracle says).
    true_impact : np.ndarray or None
        (n, n) ground-truth impact matrix, Somers' D of ``attribute_scores`` (row i -> column j).
    sample_weights : np.ndarray or None
        float array (N,): when given, training draws images with replacement with these
        probabilities (correlated sampling of factor data sets); evaluation ignores them.
    info : dict
        Free-form facts for the report (correlated pairs, source files, skipped images ...).
    independent_sample : callable or None
        ``(n, seed) -> (dataset, indices)``: up to ``n`` images whose factors are independent of
        each other, as rows ``indices`` of ``dataset`` (this data set itself when its images
        cover the factors uniformly, as a full grid does, or a separately made set). Where the
        training factors are correlated, disentanglement is measured on these (the protocol of
        Träuble et al. 2021 and Roth et al. 2023); None when the source cannot make them.
    """

    images: np.ndarray
    attributes: list[str]
    factors: Optional[np.ndarray] = None
    factor_names: list[str] = field(default_factory=list)
    factor_levels: list[int] = field(default_factory=list)
    attribute_scores: Optional[np.ndarray] = None
    true_impact: Optional[np.ndarray] = None
    sample_weights: Optional[np.ndarray] = None
    info: dict = field(default_factory=dict)
    independent_sample: Optional[Callable[[int, int], tuple["ImageDataset", np.ndarray]]] = None

    def __len__(self) -> int:
        return len(self.images)


class ScoreRequest(NamedTuple):
    """One image to score: ``key`` comes back with its scores; ``index`` is its place in the data set."""

    key: Hashable
    image: np.ndarray
    index: int
    attributes: tuple[str, ...]


class RelationOracle(abc.ABC):
    """Scores attributes of images on the 0-5 scale of the GEM paper (Sec. 3.2)."""

    #: Identifies oracle, model and prompt version in the score cache.
    cache_key: str = ""

    @abc.abstractmethod
    def score(self, images: np.ndarray, indices: np.ndarray, attributes: Sequence[str]) -> np.ndarray:
        """Score a batch.

        Parameters
        ----------
        images : uint8 array (B, H, W, 3)
        indices : int array (B,), positions of the images in the data set
        attributes : the n attribute names

        Returns
        -------
        float array (B, n) of scores in 0..5; NaN where the oracle gave no valid score.
        """

    def score_stream(self, requests: Iterable[ScoreRequest], batch_size: int = 32
                     ) -> Iterator[tuple[Hashable, np.ndarray]]:
        """Score images as a stream: yield ``(key, scores)`` as each finishes, in any order.

        ``scores`` is a float array over the request's attributes (NaN where missing). Requests
        are read lazily, so a long scoring never holds every image in memory. This default
        groups consecutive requests that ask the same attributes into batches of ``batch_size``
        for :meth:`score` (what local models want); remote oracles override it to keep a steady
        number of requests in flight with no batch barrier.
        """
        batch: list[ScoreRequest] = []

        def flush() -> Iterator[tuple[Hashable, np.ndarray]]:
            result = np.asarray(self.score(np.stack([r.image for r in batch]), np.array([r.index for r in batch]),
                                           list(batch[0].attributes)), dtype=float)
            expected = (len(batch), len(batch[0].attributes))
            if result.shape != expected:
                raise ValueError(f"oracle returned scores of shape {result.shape}, expected {expected}")
            for request, row in zip(batch, result):
                yield request.key, row
            batch.clear()

        for request in requests:
            if batch and (len(batch) >= batch_size or request.attributes != batch[0].attributes):
                yield from flush()
            batch.append(request)
        if batch:
            yield from flush()

    def stats(self) -> dict[str, int]:
        """Counters for the report: requests, retries, failures, tokens ... (empty if none)."""
        return {}

    def close(self) -> None:
        """Release clients, pools or models."""


@dataclass
class Ranking:
    """Impact matrix from a ranker: ``impact[i, j]`` is the impact of attribute i on j."""

    impact: np.ndarray
    ci_low: Optional[np.ndarray] = None
    ci_high: Optional[np.ndarray] = None
    n_used: int = 0
    notes: list[str] = field(default_factory=list)


class Ranker(abc.ABC):
    @abc.abstractmethod
    def rank(self, scores: np.ndarray) -> Ranking:
        """Turn an (N, n) score matrix (NaN = missing) into an (n, n) impact matrix."""


class GraphLearner(nn.Module, abc.ABC):
    """Holds the relation graph A (n x n, signed, diagonal 1) in attribute order."""

    #: Whether A has parameters trained with the model.
    trainable: bool = False

    @abc.abstractmethod
    def set_anchor(self, impact: torch.Tensor) -> None:
        """Initialise the graph from the (n, n) signed impact matrix S."""

    @abc.abstractmethod
    def forward(self) -> torch.Tensor:
        """Return the current signed adjacency A (n, n) with unit diagonal."""

    def penalty(self) -> torch.Tensor:
        """Regulariser added to the loss when ``trainable`` (e.g. distance to the anchor)."""
        return torch.zeros(())

    def end_step(self, step: int) -> None:
        """Called after each optimiser step (e.g. to move the anchor)."""


class Relation(Protocol):
    """The relation path an extractor's decoder reads through: latent codes z (B, n) in, decoder
    input z_rel = Aᵀz (B, n) out, differentiable in A. :class:`gem.relations.RelationModel` is
    the one gem passes to :meth:`Extractor.training_step`; a test may pass any callable with
    ``is_bound``."""

    @property
    def is_bound(self) -> bool:
        """False during the warm-up, before latents are bound to attributes; z_rel == z then."""

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """Map codes z (B, n) to the decoder input z_rel = Aᵀz (B, n)."""


class Extractor(nn.Module, abc.ABC):
    """An attribute extractor: a model with one latent dimension per attribute.

    It owns its optimisers and its training step, so methods with several optimisers
    (an adversarial discriminator, FactorVAE's critic, ...) fit without special cases.
    """

    latent_dim: int

    #: What the extractor needs besides images: None, or ``"labels"`` for methods that learn from
    #: an auxiliary variable u (iVAE's conditional prior, DEAR's weak supervision). The loop then
    #: passes ``u`` (float (B, K): the data set's ground-truth factors, or else its attribute
    #: scores) to :meth:`training_step` as a keyword.
    auxiliary: Optional[str] = None

    @abc.abstractmethod
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Create the optimisers this extractor steps (the loop passes them to accelerate)."""

    @abc.abstractmethod
    def training_step(self, x: torch.Tensor, relation: Relation, accelerator: Any,
                      optimizers: dict[str, torch.optim.Optimizer], **extra: Any) -> dict[str, float]:
        """One optimisation step on a float batch x in [0, 1] (B, 3, H, W); returns loss terms.

        The decoder reads ``relation(z)``. Gradients that reach the relation graph through it are
        left in place for the graph learner's optimiser; the extractor must not zero them.
        ``relation.is_bound`` is False during the warm-up, when z_rel == z. ``extra`` holds what
        the extractor asked for: extractors that set :attr:`auxiliary` receive ``u=``, the
        auxiliary variable of the same images.
        """

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the posterior mean and log-variance, each (B, latent_dim)."""

    @abc.abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode (B, latent_dim) codes into images in [0, 1] (B, 3, H, W)."""

    def extra_decoders(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Other ways to turn codes into images besides :meth:`decode`, by name (e.g. a diffusion
        sampler); the run writes a relation-aware traversal figure for each. None by default."""
        return {}

"""Graph learners: how the impact matrix S becomes the relation graph A the decoder uses.

* ``gcn``: GEM's DisGraph (paper Sec. 3.3, Eq. 9), refined by a GCN and trained with the model.
* ``fixed``: A = S, never trained (the paper's "GEM (Single)").
* ``identity``: A = I, independent latents (a plain β-VAE decoder path).
* ``calibrated``: A = S corrected for the oracle's measured validity (Spearman's correction for
  attenuation); optionally refined by the GCN on top, as ``gcn`` refines S.

What the training signal can and cannot do: the decoder's first layer is linear, so
decoder(Aᵀz) with first-layer weight W is exactly decoder(Bᵀz) with weight W Aᵀ B⁻ᵀ for any
invertible B. The training loss depends on A only through that product; it has no minimum in A,
and the gradient that reaches A moves it along with the decoder, not towards the true relations
(docs/results/noisy-oracle.md measures this). A learner can only end closer to the truth than S
with information S does not carry, such as the oracle's validity measured on labelled images.

A is signed, with a unit diagonal, in attribute order: ``A[i, j]`` is the weight of
attribute i in the decoder input of attribute j (z_rel = A^T z).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from gem import hookimpl
from gem.interfaces import BuildContext, GraphLearner
from gem.recipe import RecipeError


def _off_diagonal(n: int, device=None) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def signed_adjacency(magnitude: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Combine off-diagonal magnitudes in [0, 1] and signs into A with a unit diagonal."""
    n = magnitude.shape[0]
    eye = torch.eye(n, dtype=magnitude.dtype, device=magnitude.device)
    return eye + magnitude * sign * (1 - eye)


class IdentityGraph(GraphLearner):
    """A = I: every attribute is decoded from its own latent only."""

    def __init__(self, options=None, context: BuildContext | None = None):
        super().__init__()
        self.register_buffer("eye", torch.eye(len(context.attributes) if context else 1))

    def set_anchor(self, impact: torch.Tensor) -> None:
        self.eye = torch.eye(impact.shape[0], dtype=torch.float32, device=self.eye.device)

    def forward(self) -> torch.Tensor:
        return self.eye


@dataclass
class FixedGraphOptions:
    scale: float = 1.0
    """Multiplies the off-diagonal impact scores."""


class FixedGraph(GraphLearner):
    """A = scale * S off the diagonal, 1 on it; not trained."""

    def __init__(self, options: FixedGraphOptions, context: BuildContext):
        super().__init__()
        self.scale = options.scale
        n = len(context.attributes)
        self.register_buffer("adjacency", torch.eye(n))

    def set_anchor(self, impact: torch.Tensor) -> None:
        impact = impact.float().to(self.adjacency.device)
        self.adjacency = signed_adjacency(self.scale * impact.abs().clamp(max=1), torch.sign(impact))

    def forward(self) -> torch.Tensor:
        return self.adjacency


@dataclass
class GCNGraphOptions:
    hidden: int = 16
    layers: int = 2
    anchor_weight: float = 10.0
    """Weight of sum((|A| - |A0|)^2) over the edges, which keeps A near its anchor."""
    anchor_tau: float = 1.0
    """SUBLIME-style bootstrapping: every ``anchor_every`` steps anchor <- tau*anchor + (1-tau)*|A|.
    1 keeps the anchor at the oracle's S."""
    anchor_every: int = 100

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.layers < 1:
            raise ValueError("hidden and layers must be >= 1")
        if self.anchor_weight < 0:
            raise ValueError(f"anchor_weight must be >= 0, got {self.anchor_weight}")
        if not 0.0 <= self.anchor_tau <= 1.0:
            raise ValueError(f"anchor_tau must be in [0, 1], got {self.anchor_tau}")
        if self.anchor_every < 1:
            raise ValueError(f"anchor_every must be >= 1, got {self.anchor_every}")


class GCNGraph(GraphLearner):
    """DisGraph refined by a GCN (paper Eq. 9).

    The sketched adjacency A0 (edge magnitudes |S|) is fed to GCN layers
    T^(l) = tanh(D̃^-1/2 Ã D̃^-1/2 T^(l-1) Ω^(l)) with Ã = A0 + I, starting from one-hot node
    features. An asymmetric bilinear read-out of the node embeddings T gives a correction in
    logit space: |A| = sigmoid(logit(|A0|) + (T W_s)(T W_t)^T / sqrt(h)). W_t starts at zero, so
    training starts from A = A0 exactly; the signs of S are kept.
    """

    trainable = True

    def __init__(self, options: GCNGraphOptions, context: BuildContext):
        super().__init__()
        self.options = options
        n = len(context.attributes)
        self.n = n
        dims = [n] + [options.hidden] * options.layers
        # Dense layers: with a handful of nodes, dense 6x6 products cost half of the sparse
        # message passing (GCNConv), for the same normalisation and the same parameters.
        from torch_geometric.nn import DenseGCNConv  # imported here: torch_geometric takes seconds to import

        self.convs = nn.ModuleList(DenseGCNConv(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.source = nn.Linear(options.hidden, options.hidden, bias=False)
        self.target = nn.Linear(options.hidden, options.hidden, bias=False)
        nn.init.zeros_(self.target.weight)
        self.register_buffer("anchor", torch.zeros(n, n))
        self.register_buffer("initial", torch.zeros(n, n))
        self.register_buffer("sign", torch.ones(n, n))

    def set_anchor(self, impact: torch.Tensor) -> None:
        impact = impact.float().to(self.anchor.device)
        magnitude = impact.abs().clamp(max=1) * _off_diagonal(self.n, impact.device)
        self.anchor = magnitude.clone()
        self.initial = magnitude.clone()
        self.sign = torch.where(impact < 0, -1.0, 1.0)

    def node_embeddings(self) -> torch.Tensor:
        # DenseGCNConv aggregates adj[i, j] * h_j into node i; the edge i -> j carries weight A0[i, j].
        adjacency = self.initial.T
        h = torch.eye(self.n, device=self.anchor.device)
        for conv in self.convs:
            h = torch.tanh(conv(h, adjacency).squeeze(0))
        return h

    def magnitude(self) -> torch.Tensor:
        t = self.node_embeddings()
        delta = self.source(t) @ self.target(t).T / self.options.hidden ** 0.5
        base = torch.logit(self.initial.clamp(1e-3, 1 - 1e-3))
        return torch.sigmoid(base + delta) * _off_diagonal(self.n, t.device)

    def forward(self) -> torch.Tensor:
        return signed_adjacency(self.magnitude(), self.sign)

    def penalty(self) -> torch.Tensor:
        return self.options.anchor_weight * (self.magnitude() - self.anchor).pow(2).sum()

    @torch.no_grad()
    def end_step(self, step: int) -> None:
        tau = self.options.anchor_tau
        if tau < 1.0 and step % self.options.anchor_every == 0:
            self.anchor = tau * self.anchor + (1 - tau) * self.magnitude()


def oracle_validity(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Spearman's ρ between an oracle's scores and the true labels, per attribute (column).

    ``scores`` and ``labels`` are (N, n) arrays of the same images (e.g. ``oracle_scores.csv`` of
    ``gem oracle-eval`` on a labelled calibration subset); rows with a missing (NaN) score are left
    out per column. A column with fewer than 3 usable rows, or constant scores or labels, has no
    validity and gives NaN. These are the values :class:`CalibratedGraphOptions` ``validity`` takes.
    """
    from scipy.stats import spearmanr

    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=float)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores and labels must be (N, n) arrays of one shape; got {scores.shape} and {labels.shape}")
    out = np.full(scores.shape[1], np.nan)
    for j in range(scores.shape[1]):
        ok = ~(np.isnan(scores[:, j]) | np.isnan(labels[:, j]))
        a, b = scores[ok, j], labels[ok, j]
        if ok.sum() >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0:
            out[j] = spearmanr(a, b).statistic
    return out


def disattenuate(impact: torch.Tensor, validity: Sequence[float] | torch.Tensor, floor: float) -> torch.Tensor:
    """Spearman's correction for attenuation of an impact matrix, edge by edge.

    An oracle that scores attribute i with validity v_i (Spearman's ρ between its scores and the
    truth) attenuates an association between i and j by about v_i v_j; the corrected edge is
    ``S[i, j] / (v_i v_j)``, clipped to [-1, 1]. Edges with ``|S[i, j]| < floor`` are kept as
    they are: they are mostly sampling noise around 0, which the division would amplify. The
    diagonal is kept. With every validity 1 the result is S (clipped).
    """
    impact = impact.float()
    v = torch.as_tensor(validity, dtype=impact.dtype, device=impact.device).reshape(-1)
    n = impact.shape[0]
    if v.numel() == 1:
        v = v.expand(n)
    if v.numel() != n:
        raise ValueError(f"validity needs one value or one per attribute ({n}); got {v.numel()}")
    corrected = (impact / torch.outer(v, v)).clamp(-1.0, 1.0)
    keep = (impact.abs() < floor) | ~_off_diagonal(n, impact.device)
    return torch.where(keep, impact, corrected)


@dataclass
class CalibratedGraphOptions(GCNGraphOptions):
    validity: list[float] = field(default_factory=lambda: [1.0])
    """The oracle's validity: Spearman's ρ between its scores and the true labels on a labelled
    calibration subset (:func:`oracle_validity`), one value for every attribute or one per
    attribute in attribute order; each in (0, 1]. 1 (the default) leaves S as it is."""
    floor: float = 0.1
    """Edges with |S| below this are not corrected (mostly noise around 0); in [0, 1]."""
    refine: bool = False
    """Also refine the corrected graph with the GCN during training, as ``gcn`` refines S (the
    GCN options above apply then). Off: A is the corrected S, not trained."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.validity:
            raise ValueError("validity must have at least one value")
        for value in self.validity:
            if not 0.0 < value <= 1.0:
                raise ValueError(f"validity values must be in (0, 1], got {value}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {self.floor}")


class CalibratedGraph(GCNGraph):
    """A = S corrected for the oracle's measured validity (:func:`disattenuate`).

    Noise in the oracle's scores shrinks Somers' D towards 0 (attenuation), and nothing in the
    training loss can undo that (see the module docstring), so the correction uses what the
    oracle's validity on labelled images says. With ``refine`` the GCN of :class:`GCNGraph` starts
    from and is anchored at the corrected graph; without it A is the corrected graph, untrained.
    """

    def __init__(self, options: CalibratedGraphOptions, context: BuildContext):
        super().__init__(options, context)
        if len(options.validity) not in (1, self.n):
            raise RecipeError(f"graph.validity has {len(options.validity)} values; give one, or one per "
                             f"attribute ({self.n}: {', '.join(context.attributes)})")
        self.trainable = options.refine
        for p in self.parameters():
            p.requires_grad_(options.refine)

    def set_anchor(self, impact: torch.Tensor) -> None:
        impact = impact.float().to(self.anchor.device)
        super().set_anchor(disattenuate(impact, self.options.validity, self.options.floor))

    def forward(self) -> torch.Tensor:
        if not self.options.refine:
            return signed_adjacency(self.initial, self.sign)
        return super().forward()

    def penalty(self) -> torch.Tensor:
        if not self.options.refine:
            return torch.zeros((), device=self.anchor.device)
        return super().penalty()


@hookimpl
def gem_register_graph_learners(register):
    register("gcn", GCNGraph, options=GCNGraphOptions,
             description="DisGraph refined by a GCN, trained with the model (GEM Full)")
    register("fixed", FixedGraph, options=FixedGraphOptions,
             description="A = S from the ranker, never trained (GEM Single)")
    register("identity", IdentityGraph, description="A = I, independent latents (no relations)")
    register("calibrated", CalibratedGraph, options=CalibratedGraphOptions,
             description="S corrected for the oracle's measured validity (Spearman's correction for "
                         "attenuation), optionally refined by the GCN")

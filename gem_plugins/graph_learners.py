"""Graph learners: how the impact matrix S becomes the relation graph A the decoder uses.

* ``gcn``: GEM's DisGraph (paper Sec. 3.3, Eq. 9), refined by a GCN and trained with the model.
* ``fixed``: A = S, never trained (the paper's "GEM (Single)").
* ``identity``: A = I, independent latents (a plain β-VAE decoder path).

A is signed, with a unit diagonal, in attribute order: ``A[i, j]`` is the weight of
attribute i in the decoder input of attribute j (z_rel = A^T z).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch_geometric.nn import DenseGCNConv

from gem import hookimpl
from gem.interfaces import BuildContext, GraphLearner


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


@hookimpl
def gem_register_graph_learners(register):
    register("gcn", GCNGraph, options=GCNGraphOptions,
             description="DisGraph refined by a GCN, trained with the model (GEM Full)")
    register("fixed", FixedGraph, options=FixedGraphOptions,
             description="A = S from the ranker, never trained (GEM Single)")
    register("identity", IdentityGraph, description="A = I, independent latents (no relations)")

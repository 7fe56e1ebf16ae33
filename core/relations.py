"""The relation path between encoder and decoder: z_rel = A^T z in bound attribute order."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gem.interfaces import GraphLearner


class RelationModel(nn.Module):
    """A graph learner plus the binding of latent dimensions to attributes.

    Until :meth:`bind` is called it is the identity (the warm-up phase). After binding,
    a code z (B, d) in latent order is reoriented into attribute order
    (``z_attr[:, i] = sign[i] * z[:, latent_of[i]]``), mixed by the graph
    (``z_rel_attr = z_attr @ A``, i.e. ``A^T z`` per sample), and put back into latent order.
    """

    def __init__(self, graph: GraphLearner, n_attributes: int):
        super().__init__()
        self.graph = graph
        self.register_buffer("latent_of", torch.arange(n_attributes))
        self.register_buffer("sign", torch.ones(n_attributes))
        self.register_buffer("bound", torch.zeros((), dtype=torch.bool))

    def bind(self, latent_of: np.ndarray, sign: np.ndarray) -> None:
        latent_of = torch.as_tensor(np.asarray(latent_of), dtype=torch.long, device=self.latent_of.device)
        if sorted(latent_of.tolist()) != list(range(len(self.latent_of))):
            raise ValueError(f"binding must be a permutation of the latent dimensions, got {latent_of.tolist()}")
        self.latent_of.copy_(latent_of)
        self.sign.copy_(torch.as_tensor(np.asarray(sign), dtype=torch.float32))
        self.bound.fill_(True)

    @property
    def is_bound(self) -> bool:
        return bool(self.bound)

    def adjacency(self) -> torch.Tensor:
        """The current signed relation graph A (n, n) in attribute order."""
        return self.graph()

    def to_attributes(self, z: torch.Tensor) -> torch.Tensor:
        """Reorder and reorient latent-order codes (B, d) into attribute order."""
        return z[:, self.latent_of] * self.sign

    def from_attributes(self, z_attr: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_attributes`."""
        inverse = torch.argsort(self.latent_of)
        return (z_attr * self.sign)[:, inverse]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.is_bound:
            return z
        return self.from_attributes(self.to_attributes(z) @ self.graph())

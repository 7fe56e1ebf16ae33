"""DEAR (Shen et al., "Weakly Supervised Disentangled Generative Causal Representation Learning",
JMLR 23, 2022): a bidirectional generative model whose prior is a structural causal model over the
latents, trained adversarially with a joint discriminator and tied to attribute labels by a
supervised term. The GEM paper (Xie et al. 2024, Tables 1-2, Fig. 4) uses it as its supervised baseline.

What is DEAR's and what is gem's:

* Networks: gem's Burgess encoder/decoder and joint discriminator (:mod:`gem_plugins.architectures`),
  so DEAR differs from the other extractors in its objective, not in its bodies (DEAR itself uses a
  ResNet-50 encoder, a SAGAN generator with noise inputs and a big joint discriminator).
* Adversarial term: the softplus losses of :class:`~gem_plugins.losses.JointAdversarialLoss`
  (BiGAN/ALI with swapped labels for the encoder and generator). DEAR's released code trains the
  encoder on the discriminator's log-ratio and the generator on a ratio-weighted score with the
  ratio clipped to [0.5, 2], an estimator of the KL gradient. Both pull the joint distributions of
  the encoder pairs and the generator pairs together; the swapped-label loss is the one gem's own
  method uses. One forward pass serves the discriminator step and the model step (DEAR draws
  fresh prior samples for each).
* Latents: one per attribute (gem's rule), all of them in the SCM; DEAR keeps further unsupervised
  latents with an N(0, I) prior (latent_dim 100 on CelebA, the first 6 supervised).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gem import hookimpl
from gem.interfaces import BuildContext, ImageDataset, Relation
from gem.labels import auxiliary_scale
from gem.recipe import RecipeError, check_ranges
from gem_plugins.architectures import BurgessDecoder, BurgessEncoder, JointDiscriminator
from gem_plugins.losses import BaseLoss, JointAdversarialLoss
from gem_plugins.vae_family import ArchitectureOptions, AttributeModel, sample_posterior

#: The interval on which the elementwise maps of the SCM are piecewise linear (DEAR: [-5, 5]).
KNOT_RANGE = (-5.0, 5.0)


@dataclass
class DEAROptions(ArchitectureOptions):
    """Options of the DEAR extractor. Learning rates and betas are those of DEAR's released code.
    ``channels`` are those of the encoder's and the generator's convolutions, ``hidden`` the width
    of the fully connected layers (encoder, generator, discriminator)."""

    lr: float = 5e-5
    """Adam learning rate of the encoder and the generator (DEAR: lr_e = lr_g = 5e-5)."""
    disc_lr: float = 1e-4
    """Adam learning rate of the joint discriminator (DEAR: lr_d = 1e-4)."""
    prior_lr: float = 5e-5
    """Adam learning rate of the SCM's elementwise maps (DEAR: lr_p = 5e-5)."""
    adjacency_lr: float = 1e-3
    """Adam learning rate of the SCM's adjacency weights, with Adam's default betas (DEAR: lr_a = 1e-3)."""
    lambda_sup: float = 5.0
    """Weight λ of the supervised term (DEAR's CelebA script: 5; its code default is 1)."""
    sup_type: Literal["auto", "bce", "mse"] = "auto"
    """Supervised loss per latent: ``bce`` treats the code as the logit of the label scaled to [0, 1]
    (DEAR's "ce"), ``mse`` regresses the label scaled to [-1, 1] (DEAR's "l2" standardises instead),
    ``auto`` takes ``bce`` for two-class factors and ``mse`` for the others."""
    scm: Literal["linear", "nonlinear"] = "linear"
    """Elementwise map after the linear SCM: an increasing affine map per latent (DEAR's "linscm") or
    an increasing piecewise-linear one with ``scm_knots`` knots on [-5, 5] (DEAR's "nlrscm")."""
    scm_knots: int = 100
    """Knots of the ``nonlinear`` maps (DEAR: 100)."""
    super_graph: Optional[list[list[str]]] = None
    """Edges ``[parent, child]`` by attribute name that the SCM may use; it learns their weights and
    must form a DAG (DEAR is given such a super-graph). None allows every edge from an attribute to
    a later one in the recipe's attribute order (a strictly upper-triangular adjacency); ``[]``
    allows none (independent latents)."""
    disc_channels: Optional[int] = None
    """Channels of the discriminator's convolutions; defaults to ``channels`` (DEAR: 32 for both)."""
    disc_downsample: int = 1
    """The discriminator reads images average-pooled by this factor (1 = full resolution)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, non_negative=("lambda_sup",), bounds={"scm_knots": 2})
        if (self.disc_channels is not None and self.disc_channels < 1) or self.disc_downsample < 1:
            raise ValueError("disc_channels and disc_downsample must be >= 1, got "
                             f"{self.disc_channels}, {self.disc_downsample}")
        for edge in self.super_graph or []:
            if len(edge) != 2 or edge[0] == edge[1]:
                raise ValueError(f"super_graph edges are [parent, child] pairs of two different attributes, got {edge}")


def find_cycle(mask: np.ndarray) -> Optional[list[int]]:
    """A directed cycle of the graph ``mask[i, j] != 0`` (edge i -> j) as a node list whose first
    node is repeated at the end, or None for a DAG."""
    n = len(mask)
    state = [0] * n  # 0 unvisited, 1 on the current path, 2 finished
    path: list[int] = []

    def visit(i: int) -> Optional[list[int]]:
        state[i] = 1
        path.append(i)
        for j in np.flatnonzero(mask[i]):
            j = int(j)
            if state[j] == 1:
                return path[path.index(j):] + [j]
            if state[j] == 0:
                found = visit(j)
                if found:
                    return found
        state[i] = 2
        path.pop()
        return None

    for start in range(n):
        if state[start] == 0:
            found = visit(start)
            if found:
                return found
    return None


def super_graph_mask(edges: Optional[Sequence[Sequence[str]]], attributes: Sequence[str]) -> torch.Tensor:
    """The (n, n) 0/1 mask of allowed edges (row = parent, column = child) in attribute order.

    None gives the strictly upper-triangular mask; named edges must form a DAG.
    """
    n = len(attributes)
    if edges is None:
        return torch.ones(n, n).triu(1)
    index = {a: i for i, a in enumerate(attributes)}
    mask = np.zeros((n, n), dtype=np.float32)
    for parent, child in edges:
        for name in (parent, child):
            if name not in index:
                raise RecipeError(f"extractor.super_graph names {name!r}, which is not one of the recipe's "
                                  f"attributes ({', '.join(attributes)})")
        mask[index[parent], index[child]] = 1.0
    cycle = find_cycle(mask)
    if cycle is not None:
        raise RecipeError("extractor.super_graph has a cycle (" + " -> ".join(attributes[i] for i in cycle)
                          + "); DEAR's causal model needs a directed acyclic graph")
    return torch.from_numpy(mask)


class MonotonePiecewiseLinear(nn.Module):
    """n increasing piecewise-linear maps, one per latent, with shared knots t_0 < ... < t_{m-1}.

    Map k has value y0_k at t_0 and slope s_kj = 1e-3 + exp(p_kj) on segment j; outside
    [t_0, t_{m-1}] it continues the first or last segment. With m = 2 it is the affine map
    y0 + s (x - t_0) (DEAR's "linscm"); DEAR's "nlrscm" uses m = 100 on [-5, 5]. Every map starts as
    the identity, so the prior starts at N(0, I) (DEAR starts from random maps). Being strictly
    increasing, each map is invertible and keeps the orientation of its latent.
    """

    def __init__(self, n: int, knots: int = 2, low: float = KNOT_RANGE[0], high: float = KNOT_RANGE[1]):
        super().__init__()
        self.register_buffer("knots", torch.linspace(low, high, knots))
        self.width = (high - low) / (knots - 1)
        self.log_slope = nn.Parameter(torch.full((n, knots - 1), math.log(1.0 - 1e-3)))
        self.start = nn.Parameter(torch.full((n,), float(low)))

    def slopes(self) -> torch.Tensor:
        """(n, m - 1) slopes of the segments."""
        return 1e-3 + self.log_slope.exp()

    def knot_values(self) -> torch.Tensor:
        """(n, m) values of each map at the knots."""
        rises = torch.cumsum(self.slopes() * self.width, dim=1)
        return torch.cat([self.start[:, None], self.start[:, None] + rises], dim=1)

    def _segment(self, sorted_values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Segment index (clamped to the first/last segment) of each entry of x (n, B)."""
        idx = torch.searchsorted(sorted_values.contiguous(), x.contiguous(), right=True) - 1
        return idx.clamp(0, self.log_slope.shape[1] - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply map k to column k of x (B, n)."""
        xt = x.T
        seg = self._segment(self.knots.expand(len(xt), -1), xt)
        s = torch.gather(self.slopes(), 1, seg)
        y = torch.gather(self.knot_values(), 1, seg)
        return (y + s * (xt - self.knots[seg])).T

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`forward` on codes y (B, n)."""
        yt = y.T
        values = self.knot_values()
        seg = self._segment(values, yt)
        s = torch.gather(self.slopes(), 1, seg)
        return (self.knots[seg] + (yt - torch.gather(values, 1, seg)) / s).T


class CausalPrior(nn.Module):
    """DEAR's SCM prior: exogenous noise ε ~ N(0, I) (n,) -> latents z = f((I − Aᵀ)⁻¹ ε).

    A (n, n) is the learnable weight matrix times a fixed 0/1 mask of allowed edges (A[i, j] is the
    weight of the edge i -> j, so z̃_j = Σ_i A[i, j] z̃_i + ε_j with z̃ = f⁻¹(z)); f is elementwise and
    increasing (:class:`MonotonePiecewiseLinear`). The mask is a DAG (a super-graph, as DEAR is
    given, or strictly upper-triangular), so A is a DAG whatever its weights: masked entries neither
    act nor receive gradient, and I − Aᵀ is always invertible (A is nilpotent). The weights start
    at zero, as in DEAR.
    """

    def __init__(self, mask: torch.Tensor, knots: int = 2):
        super().__init__()
        n = len(mask)
        self.register_buffer("mask", mask.float())
        self.weight = nn.Parameter(torch.zeros(n, n))
        self.maps = MonotonePiecewiseLinear(n, knots)

    def adjacency(self) -> torch.Tensor:
        """The weighted DAG A (n, n), row = parent, column = child."""
        return self.weight * self.mask

    def linear(self, eps: torch.Tensor) -> torch.Tensor:
        """(I − Aᵀ)⁻¹ ε for each row ε of eps (B, n): solves z̃ (I − A) = ε."""
        eye = torch.eye(len(self.mask), device=eps.device, dtype=eps.dtype)
        return torch.linalg.solve((eye - self.adjacency()).T, eps.T).T

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        with torch.autocast(eps.device.type, enabled=False):  # a linear solve, kept in float32
            return self.maps(self.linear(eps.float()))

    @torch.no_grad()
    def intervene(self, z: torch.Tensor, dim: int, value: float) -> torch.Tensor:
        """do(z_dim = value) on codes z (B, n): the descendants of ``dim`` are recomputed from their
        exogenous noise, the other latents stay (DEAR's interventional generation)."""
        pre = self.maps.inverse(z.float())
        adjacency = self.adjacency()
        eps = pre - pre @ adjacency
        fixed = self.maps.inverse(torch.full_like(z, float(value)))[:, dim]
        for _ in range(len(self.mask)):  # A is nilpotent: n sweeps reach every descendant
            pre = pre @ adjacency + eps
            pre[:, dim] = fixed
        return self.maps(pre)


class WeakSupervisionLoss(BaseLoss):
    """DEAR's supervised term L_sup: the first m latent means are tied to the m labels.

    Labels arrive scaled to [0, 1] (see :meth:`DEAR.normalise_labels`). Where ``binary`` is True the
    code is the logit of the label (binary cross-entropy with logits, DEAR's "ce"); elsewhere it
    regresses the label mapped to [-1, 1] (squared error; centred like the logit, where code 0 is
    the middle of the range). NaN labels are missing and left out; the loss is the mean over the
    observed entries.
    """

    def __call__(self, codes: torch.Tensor, labels01: torch.Tensor,
                 binary: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        observed = torch.isfinite(labels01)
        target = torch.where(observed, labels01, torch.zeros_like(labels01))
        bce = F.binary_cross_entropy_with_logits(codes, target, reduction="none")
        mse = (codes - (2 * target - 1)).pow(2)
        per_entry = torch.where(binary.expand_as(codes), bce, mse) * observed
        loss = per_entry.sum() / observed.sum().clamp(min=1)
        return loss, {"sup": loss}


def dataset_label_scale(dataset: Optional[ImageDataset], n: int) -> Optional[np.ndarray]:
    """The largest value of each of the first min(K, n) labels (:func:`gem.labels.auxiliary_scale`);
    None when there is no data set to ask."""
    scale = auxiliary_scale(dataset)
    return None if scale is None else scale[:n]


class DEAR(AttributeModel):
    """DEAR (Shen et al., JMLR 2022): encoder E(x), generator G fed by an SCM prior, joint
    discriminator D(x, z), supervised latents.

    Each step, with z_e ~ q(z|x) (a Gaussian encoder, reparameterised, as DEAR's default) and
    z_p = F(ε), ε ~ N(0, I), where F is the :class:`CausalPrior`:

    1. D steps on the detached pairs: encoder pairs (x, z_e) against generator pairs
       (G(relation(z_p)), z_p), softplus losses;
    2. encoder, generator and SCM step on the swapped-label adversarial loss plus
       λ · L_sup(mean of E(x), u) (:class:`WeakSupervisionLoss`).

    gem's relation graph acts on top of DEAR's SCM: the SCM shapes the prior over the codes (what the
    codes of real images must look like to fool D), ``relation`` mixes codes before the generator, and
    the pairs carry the codes before mixing, as in gem's own method. With the identity graph this is
    DEAR as published; ``decode(z)`` is G(z) (callers apply the relation), which reads the causal
    latents themselves, as DEAR's traversals do. :meth:`intervene` gives DEAR's interventions,
    which move the descendants of a latent through the SCM.

    u (B, K) holds factor classes or 0-5 scores; the first min(K, n) columns supervise the first
    latents, in order (latent i is attribute i when the data set's factors are its attributes).
    Each column is divided by its largest value (:func:`dataset_label_scale`; without a data set in the
    build context, the largest value seen so far, at least 1) to lie in [0, 1]; negative or NaN
    labels count as missing (DEAR marks unlabelled images with -1).
    """

    auxiliary = "labels"
    #: Adam betas of the encoder, generator, SCM maps and discriminator (DEAR: 0 and 0.999).
    betas: tuple[float, float] = (0.0, 0.999)

    def __init__(self, options: DEAROptions, context: BuildContext):
        super().__init__(options, context)
        n = self.latent_dim
        self.encoder = BurgessEncoder(n, **options.network_sizes())
        self.generator = BurgessDecoder(n, **options.network_sizes())
        knots = 2 if options.scm == "linear" else options.scm_knots
        self.prior = CausalPrior(super_graph_mask(options.super_graph, list(context.attributes)), knots)
        self.discriminator = JointDiscriminator(n, options.image_size, options.disc_channels or options.channels,
                                                options.hidden, options.disc_downsample)
        self.adv_loss = JointAdversarialLoss()
        self.sup_loss = WeakSupervisionLoss()
        scale = dataset_label_scale(context.dataset, n)
        #: Divisor of each label column (n,; only the first min(K, n) are used) and whether it is
        #: fixed by the data set (else the running maximum of the labels seen).
        self.register_buffer("label_scale", torch.ones(n))
        self.register_buffer("label_scale_known", torch.tensor(scale is not None))
        if scale is not None:
            self.label_scale[:len(scale)] = torch.as_tensor(scale, dtype=torch.float32)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = self.options
        model = torch.optim.Adam([
            {"params": list(self.encoder.parameters()) + list(self.generator.parameters()), "lr": opts.lr},
            {"params": list(self.prior.maps.parameters()), "lr": opts.prior_lr},
            {"params": [self.prior.weight], "lr": opts.adjacency_lr, "betas": (0.9, 0.999)},
        ], betas=self.betas)
        disc = self.adam(self.discriminator.parameters(), opts.disc_lr)
        return {"model": model, "disc": disc}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.generator(z))

    @torch.no_grad()
    def intervene(self, z: torch.Tensor, dim: int, value: float) -> torch.Tensor:
        """Codes after do(z_dim = value) through DEAR's SCM (see :meth:`CausalPrior.intervene`)."""
        return self.prior.intervene(z, dim, value)

    def sample_prior(self, batch: int) -> torch.Tensor:
        """Codes z = F(ε) from the causal prior (batch, n)."""
        return self.prior(torch.randn(batch, self.latent_dim, device=self.prior.mask.device))

    def normalise_labels(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale the first min(K, n) label columns to [0, 1]; also return which are binary (m,)."""
        m = min(u.shape[1], self.latent_dim)
        labels = u[:, :m].float()
        labels = torch.where(labels < 0, torch.full_like(labels, float("nan")), labels)  # DEAR: -1 = unlabelled
        if not bool(self.label_scale_known):
            seen = torch.nan_to_num(labels, nan=0.0).amax(dim=0)
            self.label_scale[:m] = torch.maximum(self.label_scale[:m], seen)
        scale = self.label_scale[:m]
        sup_type = self.options.sup_type
        binary = (scale <= 1) if sup_type == "auto" else torch.full_like(scale, sup_type == "bce", dtype=torch.bool)
        return (labels / scale).clamp(max=1.0), binary

    def training_step(self, x: torch.Tensor, relation: Relation, accelerator: Any,
                      optimizers: dict[str, torch.optim.Optimizer], u: Optional[torch.Tensor] = None) -> dict[str, float]:
        if u is None:
            raise ValueError("the dear extractor learns from labels: training_step needs u=, the (B, K) factor "
                             "classes or attribute scores of the batch (the training loop passes them when the "
                             "data set has factors or attribute scores)")
        if u.ndim != 2 or len(u) != len(x):
            raise ValueError(f"u must be (B, K) with B = {len(x)} images, got shape {tuple(u.shape)}")
        opts = self.options
        batch = len(x)
        mu, logvar = self.encoder(x)
        z_enc = sample_posterior(mu, logvar)
        z_prior = self.sample_prior(batch).to(mu.dtype)
        x_fake = torch.sigmoid(self.generator(relation(z_prior)))
        # D steps first; encoder, generator and SCM then play against the updated D.
        loss_adv, adv_terms = self.adv_loss.step(self.discriminator, x, z_enc, x_fake, z_prior, accelerator,
                                                 optimizers["disc"])
        labels01, binary = self.normalise_labels(u)
        loss_sup, s_terms = self.sup_loss(mu[:, :labels01.shape[1]].float(), labels01, binary)
        loss = loss_adv + opts.lambda_sup * loss_sup
        return self.finish_step(loss, {**adv_terms, **s_terms}, accelerator, optimizers, "model")


@hookimpl
def gem_register_extractors(register: Any) -> None:
    register("dear", DEAR, options=DEAROptions,
             description="DEAR: bidirectional GAN with an SCM prior and label supervision (Shen et al. 2022)")

"""JointVAE (Dupont 2018, "Learning Disentangled Joint Continuous and Discrete Representations",
NeurIPS 2018): Gaussian latents plus relaxed categorical (Gumbel-softmax) latents, each group with
its own annealed capacity.

In gem the Gaussian part is the n attribute latents, and only that part goes through the relation
graph; the categorical codes are appended to the decoder input unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import nn

from gem import hookimpl
from gem.interfaces import BuildContext, Relation
from gem.recipe import check_ranges
from gem_plugins.architectures import BurgessDecoder, BurgessEncoder, init_weights
from gem_plugins.losses import AnnealedCapacityLoss, BaseLoss
from gem_plugins.vae_family import Forward, VAEExtractor, VAEOptions, sample_posterior


def gumbel_softmax(logits: torch.Tensor, temperature: float,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A relaxed one-hot sample (B, K) of the categorical softmax(logits) (Jang et al. 2017;
    Maddison et al. 2017): softmax((logits + g) / temperature) with g standard Gumbel noise.

    Rows lie on the probability simplex; as the temperature falls to 0 they become one-hot at
    the arg-max of logits + g, a sample of the categorical itself.
    """
    if generator is None:
        u = torch.rand_like(logits)
    else:
        u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).to(logits.device)
    tiny = torch.finfo(u.dtype).tiny
    exponential = -torch.log(u.clamp_min(tiny))
    gumbel = -torch.log(exponential.clamp_min(tiny))
    return torch.softmax((logits + gumbel) / temperature, dim=-1)


def kl_categorical_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || Uniform(K)) averaged over the batch, a scalar.

    Closed form: Σ_k q_k log(q_k K) = log K − H(q).
    """
    log_q = torch.log_softmax(logits, dim=-1)
    return (log_q.exp() * (log_q + math.log(logits.shape[-1]))).sum(-1).mean()


class JointVAELoss(BaseLoss):
    """JointVAE objective (Dupont 2018, Sec. 3): recon + γ_z·|KL_z − C_z(t)| + γ_c·|KL_c − C_c(t)|.

    KL_z is the Gaussian KL summed over dimensions, KL_c the KL of each categorical q(c_v|x) to
    the uniform prior, summed over the variables. Both capacities grow linearly from 0 (the
    continuous part is :class:`AnnealedCapacityLoss`); C_c is also capped at Σ_v log K_v, the
    most a set of categoricals can carry (as the paper's reference code does).

    Parameters
    ----------
    categories : the category count K_v of each discrete variable
    gamma_z, c_z, steps_z : weight, final capacity (nats) and ramp length of the Gaussian part
    gamma_c, c_c, steps_c : the same for the categorical part
    """

    def __init__(self, categories: Sequence[int], gamma_z: float = 150.0, c_z: float = 40.0,
                 steps_z: int = 300_000, gamma_c: float = 150.0, c_c: float = 1.1, steps_c: int = 300_000,
                 distribution: Literal["bernoulli", "gaussian"] = "bernoulli"):
        self.continuous = AnnealedCapacityLoss(gamma_z, c_z, steps_z, distribution)
        self.discrete = AnnealedCapacityLoss(gamma_c, c_c, steps_c, distribution)
        self.max_kl_c = sum(math.log(k) for k in categories)

    def capacity_z(self, step: int) -> float:
        return self.continuous.capacity(step)

    def capacity_c(self, step: int) -> float:
        """``min(c_c · step / steps_c, c_c, Σ_v log K_v)``."""
        return min(self.discrete.capacity(step), self.max_kl_c)

    def __call__(self, logits, x, mu, logvar, category_logits: Sequence[torch.Tensor], step: int):
        loss, terms = self.continuous(logits, x, mu, logvar, step)
        kl_c = sum(kl_categorical_uniform(c) for c in category_logits)
        capacity_c = self.capacity_c(step)
        loss = loss + self.discrete.gamma * (kl_c - capacity_c).abs()
        return loss, {**terms, "kl_c": kl_c, "capacity_c": torch.tensor(capacity_c)}


class JointEncoder(nn.Module):
    """The Burgess encoder with a wider last layer: x -> (mu, logvar, [logits of each variable])."""

    def __init__(self, latent_dim: int, categories: Sequence[int], image_size: int = 64, channels: int = 32,
                 hidden: int = 256):
        super().__init__()
        self.sizes = [latent_dim, latent_dim, *categories]
        self.body = BurgessEncoder(latent_dim, image_size, channels, hidden)
        self.body.fc[-1] = nn.Linear(hidden, sum(self.sizes))
        init_weights(self.body.fc[-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        mu, logvar, *logits = self.body.fc(self.body.conv(x)).split(self.sizes, dim=1)
        return mu, logvar, logits


@dataclass
class JointVAEOptions(VAEOptions):
    lr: float = 5e-4
    """Adam learning rate (paper's dSprites setting)."""
    discrete: list[int] = field(default_factory=lambda: [3])
    """Category count of each categorical latent. The paper's dSprites model has one variable of
    3 categories (meant for the three shapes); that is the default."""
    temperature: float = 0.67
    """Gumbel-softmax temperature (paper)."""
    gamma_z: float = 150.0
    """Weight of |KL_z − C_z| (paper, dSprites)."""
    capacity_z: float = 40.0
    """Final capacity of the Gaussian latents in nats (paper, dSprites)."""
    capacity_z_steps: int = 300_000
    """Steps over which C_z grows from 0 (paper, dSprites; scale it with short runs)."""
    gamma_c: float = 150.0
    """Weight of |KL_c − C_c| (paper, dSprites)."""
    capacity_c: float = 1.1
    """Final capacity of the categorical latents in nats (paper, dSprites); never above
    Σ log K, the most they can hold (log 3 ≈ 1.099 for the default)."""
    capacity_c_steps: int = 300_000
    """Steps over which C_c grows from 0 (paper, dSprites)."""
    decode_category: int = 0
    """Category every discrete variable takes in :meth:`JointVAE.decode`, which only gets the
    continuous codes (gem's interface); gem's choice."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.discrete or any(k < 2 for k in self.discrete):
            raise ValueError(f"discrete must list at least one variable, each with >= 2 categories, got {self.discrete}"
                             " (use annealed_vae for continuous latents only)")
        check_ranges(self, positive=("temperature",), non_negative=("gamma_z", "capacity_z", "gamma_c", "capacity_c"),
                     bounds={"capacity_z_steps": 1, "capacity_c_steps": 1})
        if not 0 <= self.decode_category < min(self.discrete):
            raise ValueError(f"decode_category must be in 0 .. {min(self.discrete) - 1} (every variable has that "
                             f"category), got {self.decode_category}")


@dataclass
class JointForward(Forward):
    """:class:`Forward` plus the categorical logits, one (B, K_v) tensor per variable."""

    category_logits: list[torch.Tensor] = field(default_factory=list)


class JointVAE(VAEExtractor):
    """JointVAE (Dupont 2018, NeurIPS; objective of Sec. 3): q(z|x) Gaussian over the n attribute
    latents, q(c_v|x) categorical per discrete variable, sampled with the Gumbel-softmax
    relaxation; the decoder reads [relation(z), c_1, ..., c_V].

    Loss: recon + γ_z·|KL(q(z|x)||N(0, I)) − C_z(t)| + γ_c·|Σ_v KL(q(c_v|x)||U(K_v)) − C_c(t)|,
    see :class:`JointVAELoss`.

    Defaults: the paper's dSprites setting as published with its reference code (one 3-way
    variable, γ_z = γ_c = 150, C_z 0 → 40 nats and C_c 0 → 1.1 nats over 300,000 steps,
    temperature 0.67, Adam lr 5e-4, batch 64). gem's choices: the number of Gaussian latents is
    the number of attributes (the paper used 6 on dSprites); the shared Burgess networks with one
    wider last encoder layer instead of the paper's own network; reconstruction summed over RGB
    pixels with :func:`~gem_plugins.losses.reconstruction_loss`.

    :meth:`decode` has no categorical input, so it uses one fixed code: category
    ``decode_category`` (default 0) for every variable. :meth:`decode_joint` takes both parts,
    :meth:`encode_joint` returns the categorical logits too, and :meth:`extra_decoders` gives one
    decoder per other category, so a run draws the traversals of each.
    """

    def __init__(self, options: JointVAEOptions, context: BuildContext):
        super().__init__(options, context)
        kw = options.network_sizes()
        self.categories = list(options.discrete)
        self.encoder = JointEncoder(self.latent_dim, self.categories, **kw)
        self.decoder = BurgessDecoder(self.latent_dim + sum(self.categories), **kw)
        self.loss = JointVAELoss(self.categories, options.gamma_z, options.capacity_z, options.capacity_z_steps,
                                 options.gamma_c, options.capacity_c, options.capacity_c_steps, options.distribution)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar, _ = self.encoder(x)
        return mu, logvar

    def encode_joint(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Posterior mean and log-variance (B, n) and the categorical logits, (B, K_v) per variable."""
        return self.encoder(x)

    def category_code(self, batch: int, categories: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """One-hot codes (batch, Σ K_v) with variable v set to ``categories[v]``."""
        code = like.new_zeros(batch, sum(self.categories))
        offset = 0
        for k, size in zip(categories, self.categories):
            code[:, offset + k] = 1.0
            offset += size
        return code

    def decode_joint(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Decode continuous codes z (B, n) (after the relation) with categorical codes c (B, Σ K_v)."""
        return torch.sigmoid(self.decoder(torch.cat([z, c.to(z.dtype)], dim=1)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        fixed = [self.options.decode_category] * len(self.categories)
        return self.decode_joint(z, self.category_code(len(z), fixed, z))

    def extra_decoders(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        out = {}
        for v, size in enumerate(self.categories):
            for k in range(size):
                if k == self.options.decode_category:
                    continue
                chosen = [self.options.decode_category] * len(self.categories)
                chosen[v] = k
                name = f"category_{k}" if len(self.categories) == 1 else f"c{v}_category_{k}"
                out[name] = lambda z, chosen=chosen: self.decode_joint(z, self.category_code(len(z), chosen, z))
        return out

    def objective(self, f: JointForward, relation: Relation, accelerator: Any, optimizers):
        return self.loss(f.logits, f.x, f.mu, f.logvar, f.category_logits, int(self.steps_done))

    def training_step(self, x: torch.Tensor, relation: Relation, accelerator: Any,
                      optimizers: dict[str, torch.optim.Optimizer], u: Optional[torch.Tensor] = None) -> dict[str, float]:
        mu, logvar, category_logits = self.encoder(x)
        z = sample_posterior(mu, logvar)
        c = torch.cat([gumbel_softmax(l, self.options.temperature) for l in category_logits], dim=1)
        logits = self.decoder(torch.cat([relation(z), c], dim=1))
        forward = JointForward(x, mu, logvar, z, logits, u=u, category_logits=category_logits)
        loss, terms = self.objective(forward, relation, accelerator, optimizers)
        return self.finish_step(loss, terms, accelerator, optimizers)


@hookimpl
def gem_register_extractors(register: Any) -> None:
    register("joint_vae", JointVAE, options=JointVAEOptions,
             description="JointVAE, Gaussian + Gumbel-softmax latents with two capacities (Dupont 2018)")

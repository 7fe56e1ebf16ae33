"""Baseline extractors of the VAE regulariser family (survey of Wang et al. 2024, Table 1), each at its
paper's defaults, all on the same Burgess encoder/decoder (:mod:`gem_plugins.vae_family`).

They are "flat" methods: run them with the ``identity`` graph learner for the methods as
published, or with ``fixed``/``gcn`` to make them relation-aware (as the GEM paper does for
FactorVAE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from gem import hookimpl
from gem.interfaces import BuildContext
from gem.recipe import check_ranges
from gem_plugins.architectures import init_weights
from gem_plugins.losses import (AnnealedCapacityLoss, BetaTCVAELoss, BetaVAELoss, DIPVAELoss, FactorVAELoss,
                                frozen, optimizer_step, permute_dims)
from gem_plugins.vae_family import Forward, VAEExtractor, VAEOptions


class VAE(VAEExtractor):
    """Plain VAE (Kingma & Welling 2014, Eq. 10): recon + KL(q(z|x) || N(0, I))."""

    def __init__(self, options: VAEOptions, context: BuildContext):
        super().__init__(options, context)
        self.loss = BetaVAELoss(1.0, options.distribution)

    def objective(self, f: Forward, relation, accelerator, optimizers):
        return self.loss(f.logits, f.x, f.mu, f.logvar)


@dataclass
class BetaVAEOptions(VAEOptions):
    beta: float = 4.0
    """KL weight (Higgins et al. 2017; 4 is their value for 64x64 data)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, non_negative=("beta",))


class BetaVAE(VAEExtractor):
    """β-VAE (Higgins et al. 2017, Eq. 4): recon + β·KL."""

    def __init__(self, options: BetaVAEOptions, context: BuildContext):
        super().__init__(options, context)
        self.loss = BetaVAELoss(options.beta, options.distribution)

    def objective(self, f: Forward, relation, accelerator, optimizers):
        return self.loss(f.logits, f.x, f.mu, f.logvar)


@dataclass
class AnnealedVAEOptions(VAEOptions):
    gamma: float = 1000.0
    """Weight of |KL − C| (Burgess et al. 2018)."""
    c_max: float = 25.0
    """Final capacity in nats (paper, dSprites)."""
    capacity_steps: int = 100_000
    """Steps over which C grows linearly from 0 (paper: 100,000; scale it with short runs)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gamma < 0 or self.c_max < 0 or self.capacity_steps < 1:
            raise ValueError("gamma and c_max must be >= 0 and capacity_steps >= 1, got "
                             f"{self.gamma}, {self.c_max}, {self.capacity_steps}")


class AnnealedVAE(VAEExtractor):
    """Annealed-capacity β-VAE (Burgess et al. 2018, Eq. 8): recon + γ·|KL − C(step)|."""

    def __init__(self, options: AnnealedVAEOptions, context: BuildContext):
        super().__init__(options, context)
        self.loss = AnnealedCapacityLoss(options.gamma, options.c_max, options.capacity_steps, options.distribution)

    def objective(self, f: Forward, relation, accelerator, optimizers):
        return self.loss(f.logits, f.x, f.mu, f.logvar, int(self.steps_done))


@dataclass
class BetaTCVAEOptions(VAEOptions):
    alpha: float = 1.0
    """Weight of the index-code mutual information (Chen et al. 2018)."""
    beta: float = 6.0
    """Weight of the total correlation."""
    gamma: float = 1.0
    """Weight of the dimension-wise KL."""
    sampling: Literal["mss", "mws"] = "mss"
    """Estimator of q(z): minibatch-stratified ("mss") or minibatch-weighted ("mws") sampling."""
    dataset_size: Optional[int] = None
    """N in the estimator; defaults to the number of images in the data set."""


class BetaTCVAE(VAEExtractor):
    """β-TCVAE (Chen et al. 2018, Eq. 4 with the estimators of Sec. 4.1 / App. C)."""

    def __init__(self, options: BetaTCVAEOptions, context: BuildContext):
        super().__init__(options, context)
        size = options.dataset_size or (len(context.dataset) if context.dataset is not None else 1)
        self.loss = BetaTCVAELoss(options.alpha, options.beta, options.gamma, size, options.sampling,
                                  options.distribution)

    def objective(self, f: Forward, relation, accelerator, optimizers):
        return self.loss(f.logits, f.x, f.mu, f.logvar, f.z)


@dataclass
class FactorVAEOptions(VAEOptions):
    gamma: float = 10.0
    """Weight of the total correlation (Kim & Mnih 2018 sweep 10 to 100)."""
    disc_lr: float = 1e-4
    """Adam learning rate of the critic (paper: 1e-4, betas 0.5 / 0.9)."""
    disc_hidden: int = 1000
    """Width of the critic's six-layer MLP (paper: 1000)."""


class TCDiscriminator(nn.Module):
    """FactorVAE's critic: a six-layer MLP (d -> 1000 x 5 -> 2) with leaky ReLU 0.2 (paper App.)."""

    def __init__(self, latent_dim: int, hidden: int = 1000):
        super().__init__()
        layers, width = [], latent_dim
        for _ in range(5):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2, inplace=True)]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))
        init_weights(self, negative_slope=0.2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class FactorVAE(VAEExtractor):
    """FactorVAE (Kim & Mnih 2018, Eq. 2 and Algorithm 2).

    The VAE term uses the whole batch. The critic sees the codes of the first half of the batch
    against dimension-wise permuted codes of the second half: the paper's two independent
    batches, drawn from one so each step encodes each image once.
    """

    def __init__(self, options: FactorVAEOptions, context: BuildContext):
        super().__init__(options, context)
        self.critic = TCDiscriminator(self.latent_dim, options.disc_hidden)
        self.loss = FactorVAELoss(options.gamma, options.distribution)

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"critic": torch.optim.Adam(self.critic.parameters(), lr=self.options.disc_lr, betas=(0.5, 0.9))}

    def critic_step(self, codes: torch.Tensor, accelerator: Any,
                    optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, torch.Tensor]:
        """Step the critic on the detached codes (B, d): the first half against the dimension-wise
        permuted second half. Returns its terms."""
        codes = codes.detach()
        half = len(codes) // 2
        loss_d, d_terms = self.loss.discriminator(self.critic(codes[:half]), self.critic(permute_dims(codes[half:])))
        optimizer_step(loss_d, accelerator, optimizers["critic"])
        return d_terms

    def objective(self, f: Forward, relation, accelerator, optimizers):
        # The critic steps first: the encoder's TC term below must not hold a graph through
        # weights the critic's optimiser then changes in place.
        d_terms = self.critic_step(f.z, accelerator, optimizers)
        with frozen(self.critic):
            loss, terms = self.loss(f.logits, f.x, f.mu, f.logvar, self.critic(f.z))
        return loss, {**terms, **d_terms}


@dataclass
class DIPVAEOptions(VAEOptions):
    lambda_od: float = 10.0
    """Weight of the off-diagonal covariance penalty (Kumar et al. 2018)."""
    lambda_d: Optional[float] = None
    """Weight of the diagonal penalty; defaults to 10·λ_od for DIP-VAE-I and λ_od for DIP-VAE-II."""


class DIPVAE(VAEExtractor):
    """DIP-VAE-I or -II (Kumar et al. 2018, Eq. 6 / 7): recon + KL + covariance penalty."""

    kind: Literal["i", "ii"] = "i"

    def __init__(self, options: DIPVAEOptions, context: BuildContext):
        super().__init__(options, context)
        lambda_d = options.lambda_d if options.lambda_d is not None else (
            10 * options.lambda_od if self.kind == "i" else options.lambda_od)
        self.loss = DIPVAELoss(self.kind, options.lambda_od, lambda_d, options.distribution)

    def objective(self, f: Forward, relation, accelerator, optimizers):
        return self.loss(f.logits, f.x, f.mu, f.logvar)


class DIPVAEI(DIPVAE):
    """DIP-VAE-I: penalises Cov[μ(x)] (Kumar et al. 2018, Eq. 6)."""

    kind = "i"


class DIPVAEII(DIPVAE):
    """DIP-VAE-II: penalises Cov_q[z] = Cov[μ(x)] + E[diag σ²(x)] (Kumar et al. 2018, Eq. 7)."""

    kind = "ii"


@hookimpl
def gem_register_extractors(register: Any) -> None:
    register("vae", VAE, options=VAEOptions, description="VAE (Kingma & Welling 2014)")
    register("beta_vae", BetaVAE, options=BetaVAEOptions, description="β-VAE (Higgins et al. 2017)")
    register("annealed_vae", AnnealedVAE, options=AnnealedVAEOptions,
             description="annealed-capacity β-VAE (Burgess et al. 2018)")
    register("beta_tcvae", BetaTCVAE, options=BetaTCVAEOptions,
             description="β-TCVAE, stratified-sampling TC estimate (Chen et al. 2018)")
    register("factor_vae", FactorVAE, options=FactorVAEOptions,
             description="FactorVAE, TC critic on permuted codes (Kim & Mnih 2018)")
    register("dip_vae_i", DIPVAEI, options=DIPVAEOptions, description="DIP-VAE-I (Kumar et al. 2018)")
    register("dip_vae_ii", DIPVAEII, options=DIPVAEOptions, description="DIP-VAE-II (Kumar et al. 2018)")

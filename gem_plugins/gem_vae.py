"""The GEM attribute extractor: a β-VAE whose decoder reads z_rel = A^T z, plus the joint
adversarial term that replaces the N(0, I) assumption the relation graph breaks
(Xie et al., NeurIPS 2024, Sec. 3.1, Eq. 2-6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from gem import hookimpl
from gem.interfaces import BuildContext, Relation
from gem.recipe import check_ranges
from gem_plugins.architectures import JointDiscriminator
from gem_plugins.losses import BetaVAELoss, JointAdversarialLoss
from gem_plugins.vae_family import Forward, VAEExtractor, VAEOptions


@dataclass
class GemVAEOptions(VAEOptions):
    beta: float = 4.0
    lambda_adv: float = 0.8
    """Weight of the adversarial term (paper Eq. 6)."""
    lambda_dis: float = 0.6
    """Weight of the β-VAE term (paper Eq. 6)."""
    adversarial: bool = True
    """False drops the discriminator (the 'without adversarial term' ablation)."""
    adversarial_from_binding: bool = True
    """Train the discriminator only once the relation graph is on. Before latents are bound the
    decoder reads z itself, the N(0, I) assumption of the β-VAE holds and the term is not needed."""
    disc_lr: float = 1e-4
    disc_channels: int = 16
    """Channels of the discriminator's convolutions (the encoder's are ``channels``)."""
    disc_downsample: int = 2
    """The discriminator reads images average-pooled by this factor (1 = full resolution)."""
    adversarial_pairs: int = 4
    """Encoder pairs and decoder pairs per application of the adversarial term (0 = the whole batch).
    The term is an expectation over pairs; a subsample estimates it at a fraction of the cost
    (see docs/design.md, "Cost of the adversarial term")."""

    adversarial_every: int = 3
    """Apply the adversarial term (and step the discriminator) on every k-th step only, with its
    weight scaled by k so its expected gradient is unchanged. 1 = every step (the paper's schedule,
    which the CelebA and LSUN recipes set); the default 3 keeps a GEM step within 1.3x a β-VAE
    step on a CPU with ``adversarial_pairs: 4`` (docs/design.md, "Cost of the adversarial term")."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, bounds={"adversarial_every": 1})
        if self.disc_channels < 1 or self.disc_downsample < 1 or self.adversarial_pairs < 0:
            raise ValueError("disc_channels and disc_downsample must be >= 1 and adversarial_pairs >= 0, got "
                             f"{self.disc_channels}, {self.disc_downsample}, {self.adversarial_pairs}")
        pooled = self.image_size // self.disc_downsample
        if self.image_size % self.disc_downsample or pooled < 16 or pooled & (pooled - 1):
            raise ValueError(f"disc_downsample {self.disc_downsample} pools image_size {self.image_size} to "
                             f"{self.image_size / self.disc_downsample:g} pixels; the discriminator needs a power of "
                             f"two >= 16: use disc_downsample 1" + (" or 2" if self.image_size >= 32 else ""))
        check_ranges(self, non_negative=("beta", "lambda_adv", "lambda_dis"))


class GemVAE(VAEExtractor):
    """β-VAE encoder E_sem, decoder D_rec fed with A^T z, and a joint discriminator D(x, z)."""

    def __init__(self, options: GemVAEOptions, context: BuildContext):
        super().__init__(options, context)
        self.discriminator = (JointDiscriminator(self.latent_dim, options.image_size, options.disc_channels,
                                                 options.hidden, options.disc_downsample)
                              if options.adversarial and options.lambda_adv > 0 else None)
        self.vae_loss = BetaVAELoss(options.beta, options.distribution)
        self.adv_loss = JointAdversarialLoss()

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self.discriminator is None:
            return {}
        return {"disc": torch.optim.Adam(self.discriminator.parameters(), lr=self.options.disc_lr, betas=(0.5, 0.999))}

    def prior_codes(self, z: torch.Tensor, relation: Relation) -> Optional[torch.Tensor]:
        """Prior samples z ~ N(0, I) for the decoder pairs, once the adversarial term is on."""
        use = self.discriminator is not None and (
            not self.options.adversarial_from_binding or relation.is_bound)
        if not use or int(self.steps_done) % self.options.adversarial_every:
            return None
        return torch.randn_like(z[:min(self.options.adversarial_pairs or len(z), len(z))])

    def objective(self, f: Forward, relation: Relation, accelerator: Any,
                  optimizers: dict[str, torch.optim.Optimizer]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        opts = self.options
        loss_dis, terms = self.vae_loss(f.logits, f.x, f.mu, f.logvar)
        loss = opts.lambda_dis * loss_dis
        if f.z_prior is None:
            return loss, terms
        batch = len(f.z_prior)
        loss_g, adv_terms = self.adv_loss.step(self.discriminator, f.x[:batch], f.z[:batch],
                                               torch.sigmoid(f.prior_logits), f.z_prior, accelerator, optimizers["disc"])
        return loss + opts.lambda_adv * opts.adversarial_every * loss_g, {**terms, **adv_terms}

@hookimpl
def gem_register_extractors(register):
    register("gem_vae", GemVAE, options=GemVAEOptions,
             description="GEM: β-VAE with relation-aware decoder input A^T z and a joint adversarial term")

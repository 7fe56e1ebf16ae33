"""The GEM attribute extractor: a β-VAE whose decoder reads z_rel = A^T z, plus the joint
adversarial term that replaces the N(0, I) assumption the relation graph breaks
(Xie et al., NeurIPS 2024, Sec. 3.1, Eq. 2-6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from gem import hookimpl
from gem.interfaces import BuildContext, Extractor, Relate
from gem_plugins.architectures import BurgessDecoder, BurgessEncoder, JointDiscriminator
from gem_plugins.losses import BetaVAELoss, JointAdversarialLoss


@dataclass
class GemVAEOptions:
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
    lr: float = 1e-4
    disc_lr: float = 1e-4
    latent_dim: Optional[int] = None
    """Defaults to the number of attributes; any other value is an error."""
    image_size: int = 64
    channels: int = 32
    hidden: int = 256
    distribution: Literal["bernoulli", "gaussian"] = "bernoulli"

    def __post_init__(self) -> None:
        for name in ("beta", "lambda_adv", "lambda_dis"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "disc_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class GemVAE(Extractor):
    """β-VAE encoder E_sem, decoder D_rec fed with A^T z, and a joint discriminator D(x, z)."""

    def __init__(self, options: GemVAEOptions, context: BuildContext):
        super().__init__()
        n = len(context.attributes)
        if options.latent_dim is not None and options.latent_dim != n:
            raise ValueError(f"extractor.latent_dim is {options.latent_dim} but the recipe models {n} attributes "
                             f"({', '.join(context.attributes)}); GEM uses one latent per attribute")
        self.options = options
        self.latent_dim = n
        kw = dict(image_size=options.image_size, channels=options.channels, hidden=options.hidden)
        self.encoder = BurgessEncoder(n, **kw)
        self.decoder = BurgessDecoder(n, **kw)
        self.discriminator = JointDiscriminator(n, **kw) if options.adversarial and options.lambda_adv > 0 else None
        self.vae_loss = BetaVAELoss(options.beta, options.distribution)
        self.adv_loss = JointAdversarialLoss()

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        optimizers = {"vae": torch.optim.Adam(params, lr=self.options.lr)}
        if self.discriminator is not None:
            optimizers["disc"] = torch.optim.Adam(self.discriminator.parameters(), lr=self.options.disc_lr,
                                                  betas=(0.5, 0.999))
        return optimizers

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))

    def training_step(self, x: torch.Tensor, relate: Relate, accelerator: Any,
                      optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        opts = self.options
        mu, logvar = self.encoder(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        logits = self.decoder(relate(z))
        loss_dis, terms = self.vae_loss(logits, x, mu, logvar)
        loss = opts.lambda_dis * loss_dis
        logs = {k: v.item() for k, v in terms.items()}

        use_adversarial = self.discriminator is not None and (
            not opts.adversarial_from_binding or getattr(relate, "is_bound", True))
        if use_adversarial:
            z_prior = torch.randn_like(z)
            x_fake = torch.sigmoid(self.decoder(relate(z_prior)))
            # Discriminator step on detached pairs.
            optimizers["disc"].zero_grad(set_to_none=True)
            loss_d, d_terms = self.adv_loss.discriminator(self.discriminator(x, z.detach()),
                                                          self.discriminator(x_fake.detach(), z_prior))
            accelerator.backward(loss_d)
            optimizers["disc"].step()
            logs.update({k: v.item() for k, v in d_terms.items()})
            # Encoder/decoder get the opposite labels; D's weights stay fixed for this part.
            self.discriminator.requires_grad_(False)
            loss_g, g_terms = self.adv_loss(self.discriminator(x, z), self.discriminator(x_fake, z_prior))
            self.discriminator.requires_grad_(True)
            loss = loss + opts.lambda_adv * loss_g
            logs.update({k: v.item() for k, v in g_terms.items()})

        optimizers["vae"].zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizers["vae"].step()
        logs["loss"] = loss.item()
        return logs


@hookimpl
def gem_register_extractors(register):
    register("gem_vae", GemVAE, options=GemVAEOptions,
             description="GEM: β-VAE with relation-aware decoder input A^T z and a joint adversarial term")

"""InfoGAN (Chen et al., "InfoGAN: Interpretable Representation Learning by Information Maximizing
Generative Adversarial Nets", NeurIPS 2016; survey of Wang et al. 2024, "GAN-based methods"): a GAN whose
generator reads latent codes c besides incompressible noise, with an auxiliary head Q on the
discriminator that recovers c from the generated image. Maximising the variational lower bound
L_I(G, Q) = E[log Q(c | G(c, noise))] + H(c) of the mutual information I(c; G(c, noise)) makes the
codes control visible factors; the paper's objective is min_{G,Q} max_D V(D, G) − λ L_I(G, Q).

gem evaluates the codes: :meth:`InfoGAN.encode` is the Q head on real images, and
:meth:`InfoGAN.decode` is the generator with the noise at zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gem import hookimpl
from gem.interfaces import BuildContext, Relation
from gem.recipe import check_ranges
from gem_plugins.architectures import BurgessDecoder, init_weights
from gem_plugins.losses import BaseLoss, frozen, optimizer_step
from gem_plugins.vae_family import ArchitectureOptions, AttributeModel


@dataclass
class InfoGANOptions(ArchitectureOptions):
    """Options of the InfoGAN extractor. Learning rates and betas are those of the paper's experiments.
    ``latent_dim`` is the number of codes c; ``channels`` are those of the generator's and the
    discriminator's convolutions, ``hidden`` the width of the generator's, the discriminator trunk's
    and the Q head's fully connected layers."""

    lr: float = 1e-3
    """Adam learning rate of the generator (paper: 1e-3)."""
    disc_lr: float = 2e-4
    """Adam learning rate of the discriminator and its Q head (paper: 2e-4)."""
    lambda_info: float = 1.0
    """Weight λ of the mutual-information term. The paper sets 1 for discrete codes and advises a
    smaller value for continuous ones, to keep λ·L_I on the scale of the GAN loss; with Q's variance
    fixed at 1 (the default, as in the paper's code, which uses λ = 1 with such codes) the term is a
    halved squared error of that scale already. Lower it (e.g. 0.1) with ``q_variance: learned``."""
    noise_dim: int = 62
    """Dimensions of the incompressible noise, uniform on [-1, 1] (paper, MNIST: 62; CelebA: 128)."""
    q_variance: Literal["fixed", "learned"] = "fixed"
    """Q(c|x) is a factored Gaussian with unit variance (``fixed``, the paper's code for continuous
    codes: −log Q is then a squared error) or with a predicted log-variance (``learned``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, non_negative=("lambda_info", "noise_dim"))


def gaussian_nll(c: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """−log N(c; mean, exp(logvar)), summed over the codes and averaged over the batch."""
    nll = 0.5 * (math.log(2 * math.pi) + logvar + (c - mean).pow(2) * torch.exp(-logvar))
    return nll.sum(dim=1).mean()


class InfoGANLoss(BaseLoss):
    """InfoGAN's losses (Chen et al. 2016, the objective min_{G,Q} max_D V(D, G) − λ L_I(G, Q) of Sec. 5)
    with the non-saturating generator loss.

    With ``real`` = D(x) and ``fake`` = D(G(c, noise)) logits (B,) and ``nll`` = −E log Q(c | G(c, noise))
    (:func:`gaussian_nll`), which lower-bounds the mutual information up to the constant H(c):

    * discriminator and Q: mean softplus(−real) + mean softplus(fake) + λ·nll
    * generator: mean softplus(−fake) + λ·nll
    """

    def __init__(self, lambda_info: float = 1.0):
        self.lambda_info = lambda_info

    def discriminator(self, real: torch.Tensor, fake: torch.Tensor,
                      nll: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gan = F.softplus(-real).mean() + F.softplus(fake).mean()
        return gan + self.lambda_info * nll, {"gan_d": gan, "info_d": nll}

    def __call__(self, fake: torch.Tensor, nll: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gan = F.softplus(-fake).mean()
        return gan + self.lambda_info * nll, {"gan_g": gan, "info": nll}


class InfoGANDiscriminator(nn.Module):
    """D(x) and Q(c|x) on a shared trunk: four 4x4 stride-2 convolutions and a fully connected layer
    (the Burgess encoder's shape, with leaky ReLU 0.2 as in the paper's discriminators), then a
    linear D head (one logit) and a Q head (one hidden layer, then the mean and, when ``learned``,
    the log-variance of each code). Like gem's other bodies it has no batch normalisation.
    """

    def __init__(self, latent_dim: int, image_size: int = 64, channels: int = 32, hidden: int = 256,
                 learned_variance: bool = False):
        super().__init__()
        layers, in_ch = [], 3
        for _ in range(4):
            layers += [nn.Conv2d(in_ch, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            in_ch = channels
        self.trunk = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * (image_size // 16) ** 2, hidden),
                                   nn.LeakyReLU(0.2, inplace=True))
        self.d_head = nn.Linear(hidden, 1)
        self.learned_variance = learned_variance
        self.q_head = nn.Sequential(nn.Linear(hidden, hidden), nn.LeakyReLU(0.2, inplace=True),
                                    nn.Linear(hidden, latent_dim * (2 if learned_variance else 1)))
        init_weights(self, negative_slope=0.2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the D logit (B,) and Q's mean and log-variance (B, latent_dim) each."""
        h = self.trunk(x)
        q = self.q_head(h)
        if self.learned_variance:
            mean, logvar = q.chunk(2, dim=1)
        else:
            mean, logvar = q, torch.zeros_like(q)  # unit variance, log 1 = 0
        return self.d_head(h).squeeze(1), mean, logvar


class InfoGAN(AttributeModel):
    """InfoGAN (Chen et al. 2016): generator G(relation(c), noise), discriminator D(x) with Q head.

    Each step draws codes c ~ U[-1, 1]^n (the paper's continuous codes, one per attribute) and
    noise ~ U[-1, 1]^noise_dim (the paper's noise), then

    1. D and Q step on real images against detached generated ones: the GAN loss plus λ·(−log Q(c|x̃));
    2. G steps against the updated D and Q: the non-saturating GAN loss plus the same λ·(−log Q).

    The generator reads ``relation(c)``, while Q predicts c itself, the code before the relation graph
    (as gem's encoder predicts z and its decoder reads A^T z). :meth:`encode` returns Q's mean and
    log-variance on real images (with the fixed variance, a constant log-variance of 0), and
    :meth:`decode` is G with the noise at 0, the centre of its range, so a code decodes to one image
    (callers apply the relation, as for every extractor).
    """

    #: Adam betas of both optimisers (paper: β1 = 0.5).
    betas: tuple[float, float] = (0.5, 0.999)

    def __init__(self, options: InfoGANOptions, context: BuildContext):
        super().__init__(options, context)
        n = self.latent_dim
        self.noise_dim = options.noise_dim
        self.generator = BurgessDecoder(n + options.noise_dim, **options.network_sizes())
        self.discriminator = InfoGANDiscriminator(n, **options.network_sizes(),
                                                  learned_variance=options.q_variance == "learned")
        self.loss = InfoGANLoss(options.lambda_info)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.adam(self.generator.parameters()),
                "disc": self.adam(self.discriminator.parameters(), self.options.disc_lr)}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, mean, logvar = self.discriminator(x)
        return mean, logvar

    def generate(self, codes: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images in [0, 1] from generator inputs ``codes`` (B, n) and ``noise`` (B, noise_dim; None = 0)."""
        if noise is None:
            noise = codes.new_zeros(len(codes), self.noise_dim)
        return torch.sigmoid(self.generator(torch.cat([codes, noise.to(codes.dtype)], dim=1)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.generate(z)

    def training_step(self, x: torch.Tensor, relation: Relation, accelerator: Any,
                      optimizers: dict[str, torch.optim.Optimizer], u: Optional[torch.Tensor] = None) -> dict[str, float]:
        batch = len(x)
        c = torch.rand(batch, self.latent_dim, device=x.device) * 2 - 1
        noise = torch.rand(batch, self.noise_dim, device=x.device) * 2 - 1
        x_fake = self.generate(relation(c), noise)
        # D and Q step on real images and detached generated ones, in one pass.
        logits, mean, logvar = self.discriminator(torch.cat([x, x_fake.detach()]))
        nll = gaussian_nll(c, mean[batch:].float(), logvar[batch:].float())
        loss_d, d_terms = self.loss.discriminator(logits[:batch], logits[batch:], nll)
        optimizer_step(loss_d, accelerator, optimizers["disc"])
        # The generator against the updated D and Q, whose weights stay fixed for this part.
        with frozen(self.discriminator):
            logits, mean, logvar = self.discriminator(x_fake)
        loss, g_terms = self.loss(logits, gaussian_nll(c, mean.float(), logvar.float()))
        return self.finish_step(loss, {**d_terms, **g_terms}, accelerator, optimizers, "generator")


@hookimpl
def gem_register_extractors(register: Any) -> None:
    register("infogan", InfoGAN, options=InfoGANOptions,
             description="InfoGAN: GAN with a mutual-information code head (Chen et al. 2016)")

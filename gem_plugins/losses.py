"""Loss terms, one class per method, each naming its paper and equation.

Shapes: images x and logits (B, 3, H, W); posterior mean and log-variance (B, d).
"""

from __future__ import annotations

import abc
from typing import Literal

import torch
import torch.nn.functional as F


def reconstruction_loss(logits: torch.Tensor, x: torch.Tensor,
                        distribution: Literal["bernoulli", "gaussian"] = "bernoulli") -> torch.Tensor:
    """Negative log-likelihood summed over pixels, averaged over the batch.

    ``bernoulli``: binary cross-entropy with logits (the usual choice for 64x64 data in
    disentanglement work); ``gaussian``: squared error of sigmoid(logits), i.e. a unit-variance
    Gaussian up to constants, also summed over pixels.
    """
    if distribution == "bernoulli":
        loss = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    else:
        loss = F.mse_loss(torch.sigmoid(logits), x, reduction="sum")
    return loss / x.shape[0]


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per dimension, averaged over the batch: shape (d,).

    Closed form 0.5 * (mu^2 + exp(logvar) - logvar - 1) (Kingma & Welling 2014, App. B).
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).mean(dim=0)


class BaseLoss(abc.ABC):
    """A method's objective; ``__call__`` returns the total and a dict of its terms."""

    @abc.abstractmethod
    def __call__(self, *args, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ...


class BetaVAELoss(BaseLoss):
    """β-VAE objective (Higgins et al. 2017, Eq. 4; GEM paper Eq. 2): recon + β·KL.

    Parameters
    ----------
    beta : weight of the KL term; 1 gives the plain VAE (Kingma & Welling 2014).
    distribution : pixel likelihood, see :func:`reconstruction_loss`.
    """

    def __init__(self, beta: float = 4.0, distribution: Literal["bernoulli", "gaussian"] = "bernoulli"):
        self.beta = beta
        self.distribution = distribution

    def __call__(self, logits, x, mu, logvar):
        recon = reconstruction_loss(logits, x, self.distribution)
        kl = kl_normal(mu, logvar).sum()
        return recon + self.beta * kl, {"recon": recon, "kl": kl}


class JointAdversarialLoss(BaseLoss):
    """GEM's adversarial term (paper Eq. 3-5), the softplus losses of a joint discriminator.

    The discriminator D(x, z) separates encoder pairs (x ~ data, z ~ q(z|x)) from decoder
    pairs (z ~ p(z), x = D_rec(A^T z)). With ``real = D(encoder pairs)`` and
    ``fake = D(decoder pairs)``, both (B,):

    * discriminator: mean softplus(-real) + mean softplus(fake)   (Eq. 5)
    * encoder/decoder: the opposite labels, mean softplus(real) + mean softplus(-fake)
    """

    def discriminator(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = F.softplus(-real).mean() + F.softplus(fake).mean()
        return loss, {"adv_d": loss}

    def __call__(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = F.softplus(real).mean() + F.softplus(-fake).mean()
        return loss, {"adv_g": loss}

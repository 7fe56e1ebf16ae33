"""Loss terms, one class per method, each naming its paper and equation.

Shapes: images x and logits (B, 3, H, W); posterior mean and log-variance (B, d).
"""

from __future__ import annotations

import abc
import math
from contextlib import contextmanager
from typing import Any, Iterator, Literal

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


def optimizer_step(loss: torch.Tensor, accelerator: Any, optimizer: torch.optim.Optimizer) -> None:
    """Backward ``loss``, step and zero ``optimizer``, in that order, so gradient accumulation
    works (accelerate skips ``step()`` and ``zero_grad()`` between updates)."""
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Turn off the gradients of ``module``'s weights inside the block: a critic or discriminator
    that has just stepped is read by the model's loss without being trained by it."""
    module.requires_grad_(False)
    try:
        yield module
    finally:
        module.requires_grad_(True)


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

    def step(self, discriminator: torch.nn.Module, real_x: torch.Tensor, real_z: torch.Tensor,
             fake_x: torch.Tensor, fake_z: torch.Tensor, accelerator, optimizer: torch.optim.Optimizer
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One round of the game (GEM, DEAR): D steps on the detached pairs, then the encoder/decoder
        loss is computed against the updated D with D's weights frozen; returns that loss and both
        sides' terms. Encoder and decoder pairs go through D as one batch."""
        batch = len(real_x)
        pair_x, pair_z = torch.cat([real_x, fake_x]), torch.cat([real_z, fake_z])
        logits = discriminator(pair_x.detach(), pair_z.detach())
        loss_d, d_terms = self.discriminator(logits[:batch], logits[batch:])
        optimizer_step(loss_d, accelerator, optimizer)
        with frozen(discriminator):
            logits = discriminator(pair_x, pair_z)
        loss_g, g_terms = self(logits[:batch], logits[batch:])
        return loss_g, {**d_terms, **g_terms}


class AnnealedCapacityLoss(BaseLoss):
    """Annealed-capacity β-VAE (Burgess et al. 2018, "Understanding disentangling in β-VAE", Eq. 8):
    recon + γ·|KL − C|, with the capacity C raised linearly from 0 to ``c_max`` nats over
    ``capacity_steps`` optimisation steps and held there.

    Parameters
    ----------
    gamma : weight of the capacity penalty (paper: 1000)
    c_max : final capacity in nats (paper, dSprites: 25)
    capacity_steps : steps over which C grows (paper: 100,000)
    """

    def __init__(self, gamma: float = 1000.0, c_max: float = 25.0, capacity_steps: int = 100_000,
                 distribution: Literal["bernoulli", "gaussian"] = "bernoulli"):
        self.gamma, self.c_max, self.capacity_steps = gamma, c_max, capacity_steps
        self.distribution = distribution

    def capacity(self, step: int) -> float:
        """C at a given step: ``c_max * min(step / capacity_steps, 1)``."""
        return self.c_max * min(step / max(self.capacity_steps, 1), 1.0)

    def __call__(self, logits, x, mu, logvar, step: int):
        recon = reconstruction_loss(logits, x, self.distribution)
        kl = kl_normal(mu, logvar).sum()
        capacity = self.capacity(step)
        return recon + self.gamma * (kl - capacity).abs(), {"recon": recon, "kl": kl,
                                                            "capacity": torch.tensor(capacity)}


def log_normal_matrix(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z_i,k; mu_j,k, exp(logvar_j,k)) for every pair of samples: shape (B, B, d).

    Entry [i, j, k] is the density of sample i's code under sample j's posterior, dimension k.
    """
    z, mu, logvar = z.unsqueeze(1), mu.unsqueeze(0), logvar.unsqueeze(0)
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar))


def log_importance_weights(batch_size: int, dataset_size: int) -> torch.Tensor:
    """Log weights (B, B) of minibatch-stratified sampling (Chen et al. 2018, App. C.2).

    Row i weighs the batch as a sample of the data set for estimating q(z_i): its own posterior
    counts 1/N, the next sample (i + 1 mod M) counts (N − M + 1) / (N (M − 1)) and the other
    M − 2 count 1/(M − 1), with M = B; each row sums to 1.
    """
    n, m = dataset_size, batch_size
    rows = torch.arange(batch_size)
    weights = torch.full((batch_size, batch_size), 1.0 / (m - 1), dtype=torch.float64)
    weights[rows, rows] = 1.0 / n
    weights[rows, (rows + 1) % batch_size] = (n - m + 1) / (n * (m - 1))
    return weights.log()


class BetaTCVAELoss(BaseLoss):
    """β-TCVAE (Chen et al. 2018, "Isolating sources of disentanglement in VAEs", Eq. 4):
    recon + α·I(x; z) + β·TC(z) + γ·Σ_k KL(q(z_k) || p(z_k)), where the aggregate posterior
    q(z) and its marginals are estimated on the minibatch.

    Parameters
    ----------
    alpha, beta, gamma : weights of the index-code mutual information, the total correlation
        and the dimension-wise KL (paper: 1, 6, 1)
    dataset_size : N, the number of training images
    sampling : ``"mss"`` minibatch-stratified sampling (App. C.2, the lower-variance estimator,
        the default) or ``"mws"`` minibatch-weighted sampling (Eq. 7 / App. C.1)
    """

    def __init__(self, alpha: float = 1.0, beta: float = 6.0, gamma: float = 1.0, dataset_size: int = 1,
                 sampling: Literal["mss", "mws"] = "mss",
                 distribution: Literal["bernoulli", "gaussian"] = "bernoulli"):
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.dataset_size, self.sampling, self.distribution = dataset_size, sampling, distribution

    def decomposition(self, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three KL terms (mutual information, total correlation, dimension-wise KL), batch means."""
        batch = z.shape[0]
        size = max(self.dataset_size, batch)  # the batch is part of the data set
        log_q_zx = (-0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar))).sum(1)
        log_p_z = (-0.5 * (math.log(2 * math.pi) + z.pow(2))).sum(1)
        matrix = log_normal_matrix(z, mu, logvar)
        if self.sampling == "mss" and batch > 2:
            weights = log_importance_weights(batch, size).to(z)
            log_q_z = torch.logsumexp(matrix.sum(2) + weights, dim=1)
            log_prod_q_zk = torch.logsumexp(matrix + weights.unsqueeze(2), dim=1).sum(1)
        else:
            norm = math.log(batch * size)
            log_q_z = torch.logsumexp(matrix.sum(2), dim=1) - norm
            log_prod_q_zk = (torch.logsumexp(matrix, dim=1) - norm).sum(1)
        return {"mi": (log_q_zx - log_q_z).mean(), "tc": (log_q_z - log_prod_q_zk).mean(),
                "dw_kl": (log_prod_q_zk - log_p_z).mean()}

    def __call__(self, logits, x, mu, logvar, z):
        recon = reconstruction_loss(logits, x, self.distribution)
        terms = self.decomposition(z, mu, logvar)
        loss = recon + self.alpha * terms["mi"] + self.beta * terms["tc"] + self.gamma * terms["dw_kl"]
        return loss, {"recon": recon, "kl": kl_normal(mu, logvar).sum().detach(), **terms}


def permute_dims(z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shuffle each latent dimension independently across the batch: a sample of Π_k q(z_k)
    (Kim & Mnih 2018, Algorithm 1)."""
    batch, dims = z.shape
    order = torch.stack([torch.randperm(batch, generator=generator, device=z.device) for _ in range(dims)], dim=1)
    return torch.gather(z, 0, order)


class FactorVAELoss(BaseLoss):
    """FactorVAE (Kim & Mnih 2018, "Disentangling by factorising", Eq. 2): recon + KL + γ·TC,
    with TC(z) ≈ E_q(z)[log D(z) / (1 − D(z))] read from a discriminator that separates codes
    from their dimension-wise permutations. For a two-logit discriminator (column 0 = "from
    q(z)", column 1 = "permuted") the log-ratio is ``logits[:, 0] − logits[:, 1]``.

    Parameters
    ----------
    gamma : weight of the total-correlation term (the paper sweeps 10 to 100 on its data sets)
    """

    def __init__(self, gamma: float = 10.0, distribution: Literal["bernoulli", "gaussian"] = "bernoulli"):
        self.gamma, self.distribution = gamma, distribution

    def __call__(self, logits, x, mu, logvar, tc_logits):
        recon = reconstruction_loss(logits, x, self.distribution)
        kl = kl_normal(mu, logvar).sum()
        tc = (tc_logits[:, 0] - tc_logits[:, 1]).mean()
        return recon + kl + self.gamma * tc, {"recon": recon, "kl": kl, "tc": tc}

    @staticmethod
    def discriminator(real_logits: torch.Tensor, permuted_logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Cross-entropy of the discriminator: class 0 for codes, class 1 for permuted codes (Alg. 2)."""
        zeros = torch.zeros(len(real_logits), dtype=torch.long, device=real_logits.device)
        ones = torch.ones(len(permuted_logits), dtype=torch.long, device=permuted_logits.device)
        loss = 0.5 * (F.cross_entropy(real_logits, zeros) + F.cross_entropy(permuted_logits, ones))
        return loss, {"tc_d": loss}


class DIPVAELoss(BaseLoss):
    """DIP-VAE (Kumar et al. 2018, "Variational inference of disentangled latent concepts",
    Eq. 6-7): recon + KL + λ_od·Σ_{i≠j} C_ij² + λ_d·Σ_i (C_ii − 1)², where C is

    * ``"i"`` (DIP-VAE-I): the covariance of the posterior means over the batch, Cov[μ(x)];
    * ``"ii"`` (DIP-VAE-II): the covariance of q(z), Cov[μ(x)] + E[diag(σ²(x))].

    Parameters
    ----------
    kind : ``"i"`` or ``"ii"``
    lambda_od, lambda_d : off-diagonal and diagonal weights (paper: λ_d = 10 λ_od for
        DIP-VAE-I, λ_d = λ_od for DIP-VAE-II)
    """

    def __init__(self, kind: Literal["i", "ii"] = "i", lambda_od: float = 10.0, lambda_d: float = 100.0,
                 distribution: Literal["bernoulli", "gaussian"] = "bernoulli"):
        self.kind, self.lambda_od, self.lambda_d, self.distribution = kind, lambda_od, lambda_d, distribution

    def covariance(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """The matrix C (d, d) the penalty pushes toward the identity."""
        centred = mu - mu.mean(dim=0, keepdim=True)
        cov = centred.T @ centred / mu.shape[0]
        if self.kind == "ii":
            cov = cov + torch.diag(logvar.exp().mean(dim=0))
        return cov

    def penalty(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        cov = self.covariance(mu, logvar)
        diag = torch.diagonal(cov)
        off = cov - torch.diag(diag)
        return self.lambda_od * off.pow(2).sum() + self.lambda_d * (diag - 1).pow(2).sum()

    def __call__(self, logits, x, mu, logvar):
        recon = reconstruction_loss(logits, x, self.distribution)
        kl = kl_normal(mu, logvar).sum()
        dip = self.penalty(mu, logvar)
        return recon + kl + dip, {"recon": recon, "kl": kl, "dip": dip}

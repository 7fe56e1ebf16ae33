"""Extractors with a label-conditioned prior: the identifiable VAE (``ivae``; Khemakhem, Kingma,
Monti & Hyvärinen 2020, "Variational autoencoders and nonlinear ICA: a unifying framework") and
iVAE + DDPM (``ivae_ddpm``; Kühne & Zemann, HPI term paper 2023/24), which adds a diffusion model of the
images conditioned on the code.

Both learn from an auxiliary variable u (``auxiliary = "labels"``): the gem training loop passes
the ground-truth factor classes of each image (or, without factors, its 0-5 attribute scores)
as ``u`` (B, K). The prior p(z | u) is a diagonal Gaussian whose log-variance (and, optionally,
mean) an MLP computes from u; the posterior q(z | x) is pulled towards it.

Normalisation of u: every column is divided by its largest class, levels − 1 (factor classes
0 … levels − 1 become 0 … 1, scores 0 … 5 become 0 … 1), with the levels read from the data set
when the extractor is built (``factor_levels``, else the largest class seen). Without a data set
(a third-party loop) set ``u_dim`` and pass u already scaled to about [0, 1]; it is used as given.

Differences from Khemakhem et al.: their encoder reads (x, u); gem encodes images alone (the
evaluation has no labels), so q(z | x) reads x only, as in the iVAE + DDPM term paper. The
encoder and decoder are the Burgess networks every VAE-family extractor here shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import nn

from gem import hookimpl
from gem.interfaces import BuildContext, Relation
from gem.labels import auxiliary_scale
from gem.recipe import RecipeError, check_ranges
from gem_plugins.architectures import init_weights
from gem_plugins.diffusion import (ConditionalUNet, DiffusionDecoder, DiffusionOptions, denoising_loss,
                                   to_model_space)
from gem_plugins.losses import BaseLoss, reconstruction_loss
from gem_plugins.vae_family import Forward, VAEExtractor, VAEOptions


def kl_gaussians(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor,
                 logvar_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) per dimension, averaged over the
    batch: shape (d,). Closed form for diagonal Gaussians,
    0.5·(logvar_p − logvar_q + (exp(logvar_q) + (mu_q − mu_p)²)/exp(logvar_p) − 1);
    with mu_p = 0, logvar_p = 0 it is :func:`gem_plugins.losses.kl_normal`."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p)
                  - 1).mean(dim=0)


class IVAELoss(BaseLoss):
    """iVAE objective (Khemakhem et al. 2020, Eq. 8, the ELBO with a conditional prior):
    recon + β·KL(q(z|x) || p(z|u)), KL summed over latents and averaged over the batch.

    Parameters
    ----------
    beta : weight of the KL term (1 is the ELBO of the paper)
    distribution : pixel likelihood, see :func:`gem_plugins.losses.reconstruction_loss`
    """

    def __init__(self, beta: float = 1.0, distribution: Literal["bernoulli", "gaussian"] = "bernoulli"):
        self.beta, self.distribution = beta, distribution

    def __call__(self, logits, x, mu, logvar, prior_mu, prior_logvar):
        recon = reconstruction_loss(logits, x, self.distribution)
        kl = kl_gaussians(mu, logvar, prior_mu, prior_logvar).sum()
        return recon + self.beta * kl, {"recon": recon, "kl": kl}


class IVAEDDPMLoss(BaseLoss):
    """iVAE + DDPM objective (Kühne & Zemann, Eq. 2): L_DDPM + λ_rec·L_rec + λ_KL·L_KL.

    * L_DDPM: the σ²(t)-weighted denoising score-matching loss of Eq. 3, i.e. the mean squared
      noise-prediction error (:func:`gem_plugins.diffusion.denoising_loss`);
    * L_rec: the iVAE decoder's reconstruction error E‖x − x̂‖², here per pixel (the pixel sum of
      :func:`gem_plugins.losses.reconstruction_loss` divided by C·H·W, so it is on the scale of
      L_DDPM, which is also a per-element mean);
    * L_KL: KL(q(z|x) || p(z|u)) in nats, summed over latents, averaged over the batch.

    The term paper does not state its reductions. This is our reading: per-element means for
    L_DDPM and L_rec, nats per image for L_KL, so the tuned weights (λ_rec = 0.1, λ_KL = 5e-4)
    make both iVAE terms small corrections to the diffusion loss, as their small values suggest.
    """

    def __init__(self, lambda_rec: float = 0.1, lambda_kl: float = 5e-4,
                 distribution: Literal["bernoulli", "gaussian"] = "gaussian"):
        self.lambda_rec, self.lambda_kl, self.distribution = lambda_rec, lambda_kl, distribution

    def __call__(self, eps_pred, noise, logits, x, mu, logvar, prior_mu, prior_logvar):
        ddpm = denoising_loss(eps_pred, noise)
        recon = reconstruction_loss(logits, x, self.distribution) / x[0].numel()
        kl = kl_gaussians(mu, logvar, prior_mu, prior_logvar).sum()
        loss = ddpm + self.lambda_rec * recon + self.lambda_kl * kl
        return loss, {"ddpm": ddpm, "recon": recon, "kl": kl}


@dataclass
class LabelPriorOptions(VAEOptions):
    """Options of the conditional prior p(z | u) (shared by ``ivae`` and ``ivae_ddpm``)."""

    prior_hidden: int = 50
    """Width of the prior MLP's two hidden layers (Khemakhem et al.'s code: 3 layers of 50,
    leaky ReLU with slope 0.1)."""
    prior_mean: bool = False
    """Also learn the prior mean from u. Off: mean 0 and only the variance depends on u, as in
    Khemakhem et al.'s code; the iVAE + DDPM term paper found not modulating the mean better."""
    u_dim: Optional[int] = None
    """K, the number of label columns, for building without a data set (otherwise read from the
    data set's factors or attribute scores, and then it must agree)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, bounds={"prior_hidden": 1})
        if self.u_dim is not None and self.u_dim < 1:
            raise ValueError(f"u_dim must be >= 1, got {self.u_dim}")


@dataclass
class IVAEOptions(LabelPriorOptions):
    beta: float = 1.0
    """Weight of KL(q(z|x) || p(z|u)); 1 is the ELBO of Khemakhem et al. (2020)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, non_negative=("beta",))


class ConditionalPrior(nn.Module):
    """p(z | u) = N(m(u), diag exp(λ(u))): an MLP (K -> hidden -> hidden -> d or 2d, leaky ReLU
    0.1) gives the log-variance λ(u) and, with ``learn_mean``, the mean m(u) (else 0).

    The output layer starts at zero, so training starts from the N(0, I) prior of a plain VAE
    (a randomly initialised prior starts with variances of e^±5 and KL terms of hundreds of nats).
    """

    def __init__(self, u_dim: int, latent_dim: int, hidden: int = 50, learn_mean: bool = False):
        super().__init__()
        self.learn_mean = learn_mean
        out = 2 * latent_dim if learn_mean else latent_dim
        self.net = nn.Sequential(nn.Linear(u_dim, hidden), nn.LeakyReLU(0.1),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, out))
        init_weights(self, negative_slope=0.1)
        nn.init.zeros_(self.net[-1].weight)

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(u)
        if self.learn_mean:
            mu, logvar = out.chunk(2, dim=1)
            return mu, logvar
        return torch.zeros_like(out), out


def label_columns(options: LabelPriorOptions, context: BuildContext, plugin: str) -> tuple[int, np.ndarray]:
    """K and the per-column divisor (levels − 1, at least 1) that maps u to about [0, 1]."""
    scale = auxiliary_scale(context.dataset)
    k, span = (None, None) if scale is None else (len(scale), scale.astype(np.float32))
    if k is None:
        if options.u_dim is None:
            raise RecipeError(f"extractor {plugin!r} needs K, the number of label columns of u: build it with a "
                              "data set that has ground-truth factors or attribute scores, or set u_dim")
        return options.u_dim, np.ones(options.u_dim, dtype=np.float32)
    if options.u_dim is not None and options.u_dim != k:
        raise RecipeError(f"extractor.u_dim is {options.u_dim} but the data set has {k} label columns")
    return k, span


class LabelPriorVAE(VAEExtractor):
    """Encoder q(z|x), decoder p(x | relation(z)) and the conditional prior p(z | u); subclasses give
    the loss. ``training_step`` requires ``u``."""

    auxiliary = "labels"
    #: Name used in error messages.
    plugin_name = "ivae"

    def __init__(self, options: LabelPriorOptions, context: BuildContext):
        super().__init__(options, context)
        k, span = label_columns(options, context, self.plugin_name)
        self.u_dim = k
        self.register_buffer("u_scale", torch.from_numpy(1.0 / span).float())
        self.prior = ConditionalPrior(k, self.latent_dim, options.prior_hidden, options.prior_mean)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One Adam over encoder, decoder, prior network (and any diffusion model)."""
        return {"vae": self.adam(self.parameters())}

    def prior_params(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance (B, d) of p(z | u) for raw labels u (B, K)."""
        return self.prior(u.to(self.u_scale) * self.u_scale)

    def check_u(self, x: torch.Tensor, u: Optional[torch.Tensor]) -> torch.Tensor:
        if u is None:
            raise ValueError(f"extractor {self.plugin_name!r} learns from labels: training_step needs u=, the "
                             f"(B, {self.u_dim}) ground-truth factor classes (or attribute scores) of the batch; "
                             "gem's training loop passes them because auxiliary = 'labels'")
        u = torch.as_tensor(u)
        if u.dim() != 2 or u.shape != (x.shape[0], self.u_dim):
            raise ValueError(f"extractor {self.plugin_name!r}: u must have shape (B, K) = ({x.shape[0]}, {self.u_dim}), "
                             f"got {tuple(u.shape)}")
        return u.to(device=x.device, dtype=torch.float32)

    def training_step(self, x: torch.Tensor, relation: Relation, accelerator: Any,
                      optimizers: dict[str, torch.optim.Optimizer], u: Optional[torch.Tensor] = None) -> dict[str, float]:
        return super().training_step(x, relation, accelerator, optimizers, u=self.check_u(x, u))


class IVAE(LabelPriorVAE):
    """iVAE (Khemakhem et al. 2020, Eq. 8): recon + β·KL(q(z|x) || p(z|u)) with
    p(z|u) = N(0 (or m(u)), diag exp(λ(u)))."""

    def __init__(self, options: IVAEOptions, context: BuildContext):
        super().__init__(options, context)
        self.loss = IVAELoss(options.beta, options.distribution)

    def objective(self, f: Forward, relation, accelerator, optimizers):
        prior_mu, prior_logvar = self.prior_params(f.u)
        return self.loss(f.logits, f.x, f.mu, f.logvar, prior_mu, prior_logvar)


@dataclass
class IVAEDDPMOptions(LabelPriorOptions, DiffusionOptions):
    lr: float = 2e-4
    """Adam learning rate of every network (Kühne & Zemann, Table 1: 2e-4)."""
    distribution: Literal["bernoulli", "gaussian"] = "gaussian"
    """Pixel loss of the iVAE decoder; the paper's L_rec is the squared error (gaussian)."""
    lambda_rec: float = 0.1
    """Weight of the iVAE reconstruction loss (Kühne & Zemann, Table 1: 0.1)."""
    lambda_kl: float = 5e-4
    """Weight of KL(q(z|x) || p(z|u)) (Kühne & Zemann, Table 1: 5e-4)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_diffusion()
        check_ranges(self, non_negative=("lambda_rec", "lambda_kl"))


class IVAEDDPM(DiffusionDecoder, LabelPriorVAE):
    """iVAE + DDPM (Kühne & Zemann, HPI term paper 2023/24, Sec. 2 and Eq. 2-3).

    The iVAE (encoder, decoder, conditional prior) plus a conditional diffusion model p(x | z): a
    U-Net of residual blocks predicts the noise of x_t from (x_t, t, relation(z)) under the VP SDE
    (:mod:`gem_plugins.diffusion`). Everything trains jointly on
    L_DDPM + λ_rec·L_rec + λ_KL·L_KL (:class:`IVAEDDPMLoss`), where z is the reparameterised sample
    of q(z|x).

    :meth:`decode` is the fast iVAE decoder; ``extra_decoders()["diffusion"]`` runs the DDIM
    sampler (``sample_steps`` steps, shared starting noise) conditioned on the code, so a run
    draws relation-aware traversals from both.

    The paper gives no U-Net sizes or schedule constants; the defaults (``DiffusionOptions``) are
    ours: 64 base channels, levels x1 x2 x2 x2 with 2 residual blocks each, β from 0.1 to 20, no
    EMA of the weights.
    """

    plugin_name = "ivae_ddpm"

    def __init__(self, options: IVAEDDPMOptions, context: BuildContext):
        super().__init__(options, context)
        self.unet = ConditionalUNet(self.latent_dim, options.unet_channels, options.unet_mults, options.unet_blocks)
        self.schedule = options.schedule()
        self.loss = IVAEDDPMLoss(options.lambda_rec, options.lambda_kl, options.distribution)

    def objective(self, f: Forward, relation, accelerator, optimizers):
        prior_mu, prior_logvar = self.prior_params(f.u)
        x0 = to_model_space(f.x)
        t = self.schedule.sample_t(len(x0), x0.device)
        noise = torch.randn_like(x0)
        eps = self.unet(self.schedule.q_sample(x0, t, noise), t, relation(f.z))
        return self.loss(eps, noise, f.logits, f.x, f.mu, f.logvar, prior_mu, prior_logvar)

    def conditional_eps(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, z)


@hookimpl
def gem_register_extractors(register: Any) -> None:
    register("ivae", IVAE, options=IVAEOptions,
             description="iVAE, prior p(z|u) conditioned on the labels (Khemakhem et al. 2020)")
    register("ivae_ddpm", IVAEDDPM, options=IVAEDDPMOptions,
             description="iVAE + DDPM: iVAE with a code-conditioned diffusion decoder (Kühne & Zemann 2023/24)")

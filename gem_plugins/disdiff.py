"""DisDiff, reduced (Yang, Wang, Lu & Zheng 2023, "DisDiff: unsupervised disentanglement of
diffusion probabilistic models", NeurIPS).

What DisDiff does. An unconditional diffusion model ε_θ(x_t, t) is taken as given. An encoder
maps an image to N latent chunks z^1 … z^N, and a decoder G_ψ(x_t, z^c, t) gives, for each chunk,
a sub-gradient field ≈ ∇ log p(z^c | x_t); by Bayes' rule their sum added to the unconditional
score is the score of p(x_t | z), so the conditional noise prediction is
ε_θ(x_t, t) − √(1 − ᾱ_t)·Σ_c G_ψ(x_t, z^c, t). Training minimises

* the reconstruction (denoising) loss of that conditional prediction, which makes the chunks
  together describe the image, and
* the disentangling loss: for a randomly chosen chunk c, the x_0 predicted with the field of c
  alone and the x_0 predicted without any field are encoded again; chunk c should be the one
  that moves (cross-entropy over chunks of the distances between the two re-encodings, the
  "invariant" part) and the one that moves towards the image's own code (cross-entropy of the
  distance reductions, the "variant" part), weighted per image by how much the field changed
  the predicted x_0.

This reduced version keeps that structure and these losses, and differs as follows:

1. **Trained jointly from scratch, in pixel space, with a small U-Net** (:mod:`gem_plugins.diffusion`,
   VP SDE with β from 0.1 to 20) instead of on top of a pre-trained, frozen DPM (the authors' is
   a 1000-step DDPM, linear β 0.0015 … 0.0155, in the latent space of a VQ autoencoder). The
   unconditional ε_θ is trained alongside with its own denoising loss (term ``denoise``); the
   conditional losses see it through a stop-gradient, so it stays the unconditional model.
2. **One scalar latent per attribute** (gem's convention) instead of a vector chunk per factor.
3. **One shared field network** for all chunks: a conditional U-Net told the chunk by a one-hot
   index and reading that chunk's value only (input [onehot(c), z_c·onehot(c)]); the paper's
   decoder has per-chunk embeddings on a U-Net sharing the pre-trained model's encoder.
4. **Noise-space fields**: G_c is added to ε_θ directly (ε = ε_θ + Σ_c G_c), i.e. our G_c is the
   paper's sub-gradient times −√(1 − ᾱ_t); same model, a better-conditioned output scale.
5. **Squared error** for the reconstruction loss (the authors' configurations use L1) and no
   EMA of the weights, no learning-rate warm-up.
6. **A Gaussian encoder with a small KL to N(0, I)** (``kl_weight``) instead of a deterministic
   one, so codes stay on the N(0, I) scale gem's traversals (±2.5) and prior samples assume. The
   fields read the reparameterised sample passed through the relation graph, relation(z).
7. **The disentangling loss compares re-encodings in the encoder's code space** (posterior
   means), with the image's own posterior mean (detached) as the target of the variant part;
   x̂_0 is clamped to [−1, 1] before it is re-encoded.
8. **A read-out decoder for** :meth:`decode`: a Burgess decoder trained on relation(z) with z
   detached (term ``readout``), so it does not shape the representation. Evaluation decodes
   thousands of codes and needs a one-pass decoder; the diffusion sampler (DDIM, ``sample_steps``
   steps, 1 + N U-Net passes per step) is ``extra_decoders()["diffusion"]`` and draws the
   relation-aware traversal figure of the diffusion decoder.

All loss terms are per-element means (noise and pixels), so their weights are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from gem import hookimpl
from gem.interfaces import BuildContext, Relation
from gem.recipe import check_ranges
from gem_plugins.diffusion import (ConditionalUNet, DiffusionDecoder, DiffusionOptions, denoising_loss,
                                   to_image_space, to_model_space)
from gem_plugins.losses import BaseLoss, kl_normal, reconstruction_loss
from gem_plugins.vae_family import AutoencoderModel, VAEOptions, sample_posterior


class DisDiffLoss(BaseLoss):
    """The reduced DisDiff objective (see the module docstring):

        denoise + recon + λ_dis·dis + kl_weight·KL(q(z|x) || N(0, I)) + readout

    * ``denoise``: ‖ε − ε_θ(x_t, t)‖² (trains the unconditional model);
    * ``recon``: ‖ε − (sg[ε_θ] + Σ_c G_c)‖² (DisDiff's reconstruction loss);
    * ``dis``: the disentangling loss, :meth:`disentangling`;
    * ``readout``: the read-out decoder's pixel loss per pixel.

    Parameters
    ----------
    lambda_dis : weight of the disentangling loss (the authors' default ``dis_weight``: 1)
    kl_weight : weight of the KL of the Gaussian encoder
    """

    def __init__(self, lambda_dis: float = 1.0, kl_weight: float = 5e-4, distribution: str = "bernoulli"):
        self.lambda_dis, self.kl_weight, self.distribution = lambda_dis, kl_weight, distribution

    @staticmethod
    def disentangling(z_plain: torch.Tensor, z_field: torch.Tensor, z_true: torch.Tensor, chunk: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
        """DisDiff's disentangling loss for one chosen chunk c per image.

        z_plain, z_field : (B, N) codes of the x_0 predicted without any field and with the field
            of chunk c alone; z_true : (B, N) the image's own code; chunk : (B,) the index c;
            weight : (B,) per-image weight. With distances per chunk k,
            moved_k = |z_plain_k − z_field_k| and closer_k = |z_plain_k − z_true_k| − |z_field_k − z_true_k|,
            the loss is mean_b weight_b·(CE(moved_b, c_b) + CE(closer_b, c_b)).
        """
        moved = (z_plain - z_field).abs()
        closer = (z_plain - z_true).abs() - (z_field - z_true).abs()
        ce = F.cross_entropy(moved, chunk, reduction="none") + F.cross_entropy(closer, chunk, reduction="none")
        return (weight * ce).mean()

    def __call__(self, noise, eps_plain, eps_cond, dis, mu, logvar, readout_logits, x):
        denoise = denoising_loss(eps_plain, noise)
        recon = denoising_loss(eps_cond, noise)
        kl = kl_normal(mu, logvar).sum()
        readout = reconstruction_loss(readout_logits, x, self.distribution) / x[0].numel()
        loss = denoise + recon + self.lambda_dis * dis + self.kl_weight * kl + readout
        return loss, {"denoise": denoise, "recon": recon, "dis": dis, "kl": kl, "readout": readout}


@dataclass
class DisDiffOptions(VAEOptions, DiffusionOptions):
    lambda_dis: float = 1.0
    """Weight of the disentangling loss (the authors' code: dis_weight = 1)."""
    kl_weight: float = 5e-4
    """Weight of KL(q(z|x) || N(0, I)); not in DisDiff (deterministic encoder), kept small so it
    only fixes the scale of the codes (the iVAE + DDPM term paper's λ_KL at the same loss scale)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_diffusion()
        check_ranges(self, non_negative=("lambda_dis", "kl_weight"))


class DisDiff(DiffusionDecoder, AutoencoderModel):
    """DisDiff (Yang et al., NeurIPS 2023), reduced: encoder → one scalar per attribute, an
    unconditional U-Net ε_θ, one field U-Net G(x_t, t, z_c, c) per chunk, trained jointly with the
    reconstruction and disentangling losses; ``decoder`` is a read-out decoder for :meth:`decode`.
    See the module docstring for every difference from the paper."""

    def __init__(self, options: DisDiffOptions, context: BuildContext):
        super().__init__(options, context)
        n = self.latent_dim
        kw = dict(channels=options.unet_channels, mults=options.unet_mults, blocks=options.unet_blocks)
        self.eps_model = ConditionalUNet(0, **kw)
        self.field_model = ConditionalUNet(2 * n, **kw)
        self.schedule = options.schedule()
        self.loss = DisDiffLoss(options.lambda_dis, options.kl_weight, options.distribution)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One Adam over the encoder, both U-Nets and the read-out decoder."""
        return {"vae": self.adam(self.parameters())}

    def fields(self, x_t: torch.Tensor, t: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The N noise-space fields G_c (B, N, C, H, W), one batched pass over B·N inputs;
        ``codes`` (B, N) are the decoder inputs (relation(z))."""
        batch, n = codes.shape
        eye = torch.eye(n, device=codes.device, dtype=codes.dtype)
        cond = torch.cat([eye.expand(batch, n, n), codes[:, :, None] * eye], dim=2).reshape(batch * n, 2 * n)
        x_rep = x_t.unsqueeze(1).expand(batch, n, *x_t.shape[1:]).reshape(batch * n, *x_t.shape[1:])
        out = self.field_model(x_rep, t.repeat_interleave(n), cond)
        return out.reshape(batch, n, *x_t.shape[1:])

    def conditional_eps(self, x_t: torch.Tensor, t: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """ε(x_t, t | z) = ε_θ(x_t, t) + Σ_c G_c(x_t, t, z_c)."""
        return self.eps_model(x_t, t) + self.fields(x_t, t, codes).sum(dim=1)

    def _reencode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.encoder(to_image_space(x0.clamp(-1, 1)))[0]

    def training_step(self, x: torch.Tensor, relation: Relation, accelerator: Any,
                      optimizers: dict[str, torch.optim.Optimizer], u: Optional[torch.Tensor] = None) -> dict[str, float]:
        mu, logvar = self.encoder(x)
        z = sample_posterior(mu, logvar)
        codes = relation(z)
        readout_logits = self.decoder(relation(z.detach()))
        x0 = to_model_space(x)
        batch, n = mu.shape
        t = self.schedule.sample_t(batch, x.device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.q_sample(x0, t, noise)
        eps_plain = self.eps_model(x_t, t)
        base = eps_plain.detach()
        fields = self.fields(x_t, t, codes)
        eps_cond = base + fields.sum(dim=1)
        # Disentangling loss: one chunk per image, its field alone against no field.
        chunk = torch.randint(n, (batch,), device=x.device)
        field_c = fields[torch.arange(batch, device=x.device), chunk]
        x0_plain = self.schedule.predict_x0(x_t, t, base)
        x0_field = self.schedule.predict_x0(x_t, t, base + field_c)
        with torch.no_grad():
            z_plain = self._reencode(x0_plain)
            weight = (x0_plain.clamp(-1, 1) - x0_field.clamp(-1, 1)).pow(2).flatten(1).mean(dim=1)
        dis = self.loss.disentangling(z_plain, self._reencode(x0_field), mu.detach(), chunk, weight)
        loss, terms = self.loss(noise, eps_plain, eps_cond, dis, mu, logvar, readout_logits, x)
        return self.finish_step(loss, terms, accelerator, optimizers)


@hookimpl
def gem_register_extractors(register: Any) -> None:
    register("disdiff", DisDiff, options=DisDiffOptions,
             description="DisDiff, reduced: per-attribute gradient fields of a jointly trained diffusion model "
                         "(Yang et al. 2023)")

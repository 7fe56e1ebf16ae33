"""The bases every built-in extractor builds on.

* :class:`ArchitectureOptions`: the recipe keys of the shared networks (learning rate, latent size,
  image size, widths) with their range checks.
* :class:`AttributeModel`: an :class:`~gem.interfaces.Extractor` with one latent per attribute, its
  options, a step counter and the optimiser plumbing (Adam with the class's betas, the
  backward/step/zero order, the logged terms); InfoGAN and DEAR build on it directly.
* :class:`AutoencoderModel`: plus one Burgess encoder/decoder pair (Burgess et al. 2018); DisDiff
  builds on it.
* :class:`VAEExtractor`: plus one training step and a per-method ``objective``. The VAE baselines
  therefore differ only in their loss (and, for FactorVAE, a critic), which keeps comparisons fair.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Optional

import torch

from gem.interfaces import BuildContext, Extractor, Relation
from gem.recipe import RecipeError, check_ranges
from gem_plugins.architectures import BurgessDecoder, BurgessEncoder, check_image_size
from gem_plugins.losses import optimizer_step


def check_learning_rates(options: Any) -> None:
    """Every ``lr`` / ``*_lr`` field of an options dataclass must be > 0."""
    check_ranges(options, positive=[name for name in vars(options) if name == "lr" or name.endswith("_lr")])


def attribute_latent_dim(options: Any, context: BuildContext) -> int:
    """The latent size: one latent per attribute; an ``options.latent_dim`` that disagrees is an error."""
    n = len(context.attributes)
    if options.latent_dim is not None and options.latent_dim != n:
        raise RecipeError(f"extractor.latent_dim is {options.latent_dim} but the recipe models {n} attributes "
                          f"({', '.join(context.attributes)}); gem uses one latent per attribute")
    return n


def sample_posterior(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """A reparameterised sample z = mu + eps * exp(logvar / 2), eps ~ N(0, I)."""
    return mu + torch.randn_like(mu) * (0.5 * logvar).exp()


@dataclass
class ArchitectureOptions:
    """Options every built-in extractor has: the sizes of its networks and its main learning rate.
    Subclasses change defaults by declaring a field again; every ``lr`` / ``*_lr`` field must be > 0."""

    lr: float = 1e-4
    """Adam learning rate of the main networks (the encoder and decoder of a VAE)."""
    latent_dim: Optional[int] = None
    """Defaults to the number of attributes; any other value is an error."""
    image_size: int = 64
    channels: int = 32
    """Channels of the convolutions."""
    hidden: int = 256
    """Width of the fully connected layers."""

    def __post_init__(self) -> None:
        check_learning_rates(self)
        check_image_size(self.image_size)  # what the Burgess networks need, checked with the recipe

    def network_sizes(self) -> dict[str, int]:
        """``image_size``, ``channels`` and ``hidden``, the keyword arguments of the Burgess networks."""
        return dict(image_size=self.image_size, channels=self.channels, hidden=self.hidden)


@dataclass
class VAEOptions(ArchitectureOptions):
    """Options every VAE-family extractor has."""

    distribution: Literal["bernoulli", "gaussian"] = "bernoulli"


class AttributeModel(Extractor):
    """An extractor with one latent per attribute (``latent_dim``), built from
    :class:`ArchitectureOptions` (``options``).

    ``steps_done`` counts optimisation steps (a buffer, so it is saved and restored with the
    model) for schedules such as the annealed capacity. Subclasses build their networks after
    ``super().__init__`` and end :meth:`training_step` with :meth:`finish_step`.
    """

    #: Adam betas of the optimisers :meth:`adam` makes.
    betas: tuple[float, float] = (0.9, 0.999)

    def __init__(self, options: ArchitectureOptions, context: BuildContext):
        super().__init__()
        self.latent_dim = attribute_latent_dim(options, context)
        self.options = options
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def adam(self, params: Iterable[Any], lr: Optional[float] = None) -> torch.optim.Adam:
        """Adam over ``params`` with :attr:`betas` and ``lr`` (default: ``options.lr``)."""
        return torch.optim.Adam(params, lr=self.options.lr if lr is None else lr, betas=self.betas)

    def finish_step(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], accelerator: Any,
                    optimizers: dict[str, torch.optim.Optimizer], optimizer: str = "vae") -> dict[str, float]:
        """Backward, step and zero ``optimizers[optimizer]``, count the step; returns the logged terms
        (``terms`` as floats plus ``loss``)."""
        optimizer_step(loss, accelerator, optimizers[optimizer])
        self.steps_done += 1
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs["loss"] = loss.item()
        return logs


class AutoencoderModel(AttributeModel):
    """An :class:`AttributeModel` with the shared Burgess encoder q(z|x) and decoder (image logits);
    :meth:`encode` is the encoder, :meth:`decode` the decoder's sigmoid."""

    def __init__(self, options: ArchitectureOptions, context: BuildContext):
        super().__init__(options, context)
        self.encoder = BurgessEncoder(self.latent_dim, **options.network_sizes())
        self.decoder = BurgessDecoder(self.latent_dim, **options.network_sizes())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))


@dataclass
class Forward:
    """One pass through the encoder and decoder: the inputs of every objective.

    x : images (B, 3, H, W) in [0, 1]; mu, logvar, z : posterior mean, log-variance and
    reparameterised sample (B, d); logits : decoder output for ``relation(z)`` (B, 3, H, W);
    z_prior, prior_logits : the codes :meth:`VAEExtractor.prior_codes` asked for (K, d) and
    their decoder output (K, 3, H, W), or None; u : the auxiliary variable (B, K) for
    extractors that set ``auxiliary``, else None.
    """

    x: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    logits: torch.Tensor
    z_prior: Optional[torch.Tensor] = None
    prior_logits: Optional[torch.Tensor] = None
    u: Optional[torch.Tensor] = None


class VAEExtractor(AutoencoderModel):
    """Encoder q(z|x) and decoder p(x|z_rel) with z_rel = relation(z); subclasses give the loss."""

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        return {"vae": self.adam(params), **self.extra_optimizers()}

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimisers of extra networks (critics, discriminators); none by default."""
        return {}

    def prior_codes(self, z: torch.Tensor, relation: Relation) -> Optional[torch.Tensor]:
        """Codes to decode along with z in the same pass (e.g. prior samples for an adversarial
        term); None (the default) for none."""
        return None

    @abc.abstractmethod
    def objective(self, f: Forward, relation: Relation, accelerator: Any,
                  optimizers: dict[str, torch.optim.Optimizer]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The encoder/decoder loss and its named terms. Extra networks may take their own
        optimiser step here (their optimisers are in ``optimizers``) with
        :func:`~gem_plugins.losses.optimizer_step`: backward, ``step()``, then ``zero_grad()``, in
        that order, so gradient accumulation works (accelerate skips both calls between updates)."""

    def training_step(self, x: torch.Tensor, relation: Relation, accelerator: Any,
                      optimizers: dict[str, torch.optim.Optimizer], u: Optional[torch.Tensor] = None) -> dict[str, float]:
        mu, logvar = self.encoder(x)
        z = sample_posterior(mu, logvar)
        z_prior = self.prior_codes(z, relation)
        if z_prior is None:
            forward = Forward(x, mu, logvar, z, self.decoder(relation(z)), u=u)
        else:  # one relation pass (one graph evaluation) and one decoder pass for both
            logits = self.decoder(relation(torch.cat([z, z_prior])))
            forward = Forward(x, mu, logvar, z, logits[:len(z)], z_prior, logits[len(z):], u=u)
        return self.finish_step(*self.objective(forward, relation, accelerator, optimizers), accelerator, optimizers)

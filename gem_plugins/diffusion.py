"""A small diffusion toolkit shared by the diffusion-based extractors (:mod:`gem_plugins.ivae`'s
``ivae_ddpm`` and :mod:`gem_plugins.disdiff`). Not a plugin.

* :class:`VPSchedule`: the variance-preserving SDE of Song et al. (2021, "Score-based generative
  modeling through SDEs", Eq. 11 and App. B) with the linear rate β(t) = β_min + t(β_max − β_min),
  t ∈ [0, 1]. Its marginal is q(x_t | x_0) = N(√ᾱ(t)·x_0, (1 − ᾱ(t))·I) with
  ᾱ(t) = exp(−β_min·t − ½(β_max − β_min)·t²). With β_min = 0.1 and β_max = 20 it is the
  continuous-time limit of DDPM's 1000-step linear schedule β_1 = 1e-4 … β_1000 = 0.02 (Ho et al.
  2020): :func:`ddpm_betas` gives those discrete steps.
* :class:`ConditionalUNet`: a small U-Net of residual blocks (GroupNorm, SiLU, 3x3 convolutions)
  that predicts the noise ε from x_t, the time t and an optional condition vector c (a latent
  code); time and condition enter every block as a FiLM scale and shift.
* :func:`denoising_loss`: the noise-prediction error. With the weighting λ(t) = σ²(t) the
  denoising score-matching loss of the iVAE + DDPM term paper (Kühne & Zemann 2023/24, Eq. 3) is exactly this
  error: the target score of q(x_t | x_0) is −ε/σ(t) and the model's score is −ε̂/σ(t), so
  σ²‖−ε/σ + ε̂/σ‖² = ‖ε − ε̂‖².
* :func:`ddim_sample`: the DDIM sampler (Song, Meng & Ermon 2021, Eq. 12) on an evenly spaced time
  grid with a handful of steps; η = 0 is deterministic given the starting noise, η = 1 is the
  ancestral DDPM sampler on that grid.

Images are in [0, 1]; the diffusion models work on 2x − 1 ∈ [−1, 1] (:func:`to_model_space`).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: eps_fn(x_t, t) -> predicted noise, with x_t (B, C, H, W) and t (B,).
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DiffusionOptions:
    """Options of the diffusion part an extractor adds (mixed into its options dataclass)."""

    unet_channels: int = 64
    """Channels of the U-Net's first level (DDPM's U-Net uses 128 at 32x32; 64 keeps it small)."""
    unet_mults: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    """Channel multiplier of each U-Net level; every level after the first halves the resolution,
    so image_size must be divisible by 2^(levels − 1)."""
    unet_blocks: int = 2
    """Residual blocks per level (DDPM: 2)."""
    beta_min: float = 0.1
    """β(0) of the VP SDE (Song et al. 2021: 0.1, i.e. DDPM's β_1 = 1e-4 over 1000 steps)."""
    beta_max: float = 20.0
    """β(1) of the VP SDE (Song et al. 2021: 20, i.e. DDPM's β_1000 = 0.02)."""
    t_min: float = 1e-3
    """Smallest diffusion time drawn in training (Song et al. 2021 use 1e-5 to 1e-3)."""
    sample_steps: int = 20
    """DDIM steps of the diffusion decoder used for traversal figures."""
    sample_eta: float = 0.0
    """DDIM noise η (0: deterministic given the starting noise; 1: ancestral sampling)."""
    sample_seed: int = 0
    """Seed of the starting noise of the diffusion decoder. All codes of one call share one noise
    image, so a traversal row differs only by the code."""

    def check_diffusion(self) -> None:
        """Range checks; options classes that mix this in call it from ``__post_init__``."""
        if self.unet_channels < 1 or self.unet_blocks < 1 or not self.unet_mults or min(self.unet_mults) < 1:
            raise ValueError("unet_channels, unet_blocks and every unet_mults entry must be >= 1, got "
                             f"{self.unet_channels}, {self.unet_blocks}, {self.unet_mults}")
        if not 0 < self.beta_min < self.beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {self.beta_min}, {self.beta_max}")
        if not 0 < self.t_min < 1:
            raise ValueError(f"t_min must be in (0, 1), got {self.t_min}")
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if not 0 <= self.sample_eta <= 1:
            raise ValueError(f"sample_eta must be in [0, 1], got {self.sample_eta}")
        image_size = getattr(self, "image_size", None)
        factor = 2 ** (len(self.unet_mults) - 1)
        if image_size is not None and image_size % factor:
            raise ValueError(f"image_size {image_size} is not divisible by 2^(len(unet_mults) - 1) = {factor}; "
                             "use fewer U-Net levels")

    def schedule(self) -> "VPSchedule":
        return VPSchedule(self.beta_min, self.beta_max, self.t_min)


def to_model_space(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> [−1, 1], the range the diffusion models work in."""
    return 2 * x - 1


def to_image_space(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] -> images in [0, 1] (clamped)."""
    return ((x + 1) / 2).clamp(0, 1)


def ddpm_betas(steps: int = 1000, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """The discrete DDPM schedule the VP SDE discretises: β_i = (β_min + (i − 1)/(N − 1)·(β_max −
    β_min)) / N for i = 1..N (Song et al. 2021, App. B); N = 1000 gives Ho et al.'s 1e-4 … 0.02."""
    return torch.linspace(beta_min, beta_max, steps, dtype=torch.float64) / steps


class VPSchedule:
    """Variance-preserving SDE dx = −½β(t)x dt + √β(t) dW with β(t) = β_min + t(β_max − β_min).

    All methods take t as a float tensor (B,) (or a scalar) in [0, 1] and broadcast over images.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        self.beta_min, self.beta_max, self.t_min = float(beta_min), float(beta_max), float(t_min)

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """log ᾱ(t) = −∫₀ᵗ β(s) ds = −β_min·t − ½(β_max − β_min)·t²."""
        t = torch.as_tensor(t)
        return -self.beta_min * t - 0.5 * (self.beta_max - self.beta_min) * t * t

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self.log_alpha_bar(t).exp()

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean coefficient √ᾱ(t) and standard deviation σ(t) = √(1 − ᾱ(t)) of q(x_t | x_0)."""
        log_ab = self.log_alpha_bar(t)
        return (0.5 * log_ab).exp(), (-torch.expm1(log_ab)).clamp_min(0).sqrt()

    @staticmethod
    def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        coef = coef.to(device=like.device, dtype=like.dtype)
        return coef.reshape(coef.shape + (1,) * (like.dim() - coef.dim()))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(√ᾱ(t)·x_0, (1 − ᾱ(t))·I) with the given standard noise."""
        mean, std = self.marginal(t)
        return self._expand(mean, x0) * x0 + self._expand(std, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The x_0 a noise prediction implies: (x_t − σ(t)·ε) / √ᾱ(t)."""
        mean, std = self.marginal(t)
        return (x_t - self._expand(std, x_t) * eps) / self._expand(mean, x_t)

    def sample_t(self, batch: int, device: torch.device | str | None = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Training times in [t_min, 1], one per image, from the low-discrepancy sampler of Kingma
        et al. (2021, "Variational diffusion models", App. I.1): one uniform offset plus an even
        grid, so every batch covers the whole time range (a lower-variance loss estimate)."""
        offset = torch.rand((), generator=generator)
        u = (offset + torch.arange(batch, dtype=torch.float32) / batch) % 1.0
        return (self.t_min + (1 - self.t_min) * u).to(device)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of times t ∈ [0, 1], scaled by 1000 like a DDPM step index
    (Vaswani et al. 2017; Ho et al. 2020)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half, 1))
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 when possible (Wu & He 2018), else the largest with >= 2 channels each."""
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


class ResBlock(nn.Module):
    """Norm, SiLU, conv; FiLM from the embedding; norm, SiLU, conv; plus a (1x1) skip connection."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb)).chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(h))


class ConditionalUNet(nn.Module):
    """ε̂(x_t, t, c): noise prediction (B, C, H, W) from x_t (B, C, H, W), t (B,) and an optional
    condition c (B, cond_dim) (``cond_dim=0``: unconditional).

    Each level has ``blocks`` residual blocks; levels after the first start with a stride-2
    convolution. The decoder mirrors it (nearest-neighbour upsampling, 3x3 conv) and reads the
    encoder's output of each level through a skip connection. The output convolution starts at
    zero, so an untrained model predicts ε̂ = 0.
    """

    def __init__(self, cond_dim: int = 0, channels: int = 64, mults: Sequence[int] = (1, 2, 2, 2), blocks: int = 2,
                 image_channels: int = 3):
        super().__init__()
        self.cond_dim, self.channels = cond_dim, channels
        emb_dim = 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_mlp = (nn.Sequential(nn.Linear(cond_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                         if cond_dim > 0 else None)
        self.stem = nn.Conv2d(image_channels, channels, 3, padding=1)
        widths = [channels * m for m in mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = channels
        for i, width in enumerate(widths):
            self.downsample.append(nn.Conv2d(prev, prev, 3, stride=2, padding=1) if i > 0 else nn.Identity())
            level = nn.ModuleList()
            for _ in range(blocks):
                level.append(ResBlock(prev, width, emb_dim))
                prev = width
            self.down.append(level)
        self.mid = nn.ModuleList([ResBlock(prev, prev, emb_dim), ResBlock(prev, prev, emb_dim)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            level = nn.ModuleList()
            for j in range(blocks):
                level.append(ResBlock(prev + width if j == 0 else prev, width, emb_dim))
                prev = width
            self.up.append(level)
            self.upsample.append(nn.Conv2d(prev, prev, 3, padding=1) if i > 0 else nn.Identity())
        self.out_norm = nn.GroupNorm(_groups(prev), prev)
        self.out = nn.Conv2d(prev, image_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.channels).to(x.dtype))
        if self.cond_mlp is not None:
            if cond is None:
                raise ValueError(f"this U-Net is conditioned on a ({self.cond_dim},) code; pass cond")
            emb = emb + self.cond_mlp(cond.to(x.dtype))
        h = self.stem(x)
        skips = []
        for down, level in zip(self.downsample, self.down):
            h = down(h)
            for block in level:
                h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for i, (level, up) in enumerate(zip(self.up, self.upsample)):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in level:
                h = block(h, emb)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))


def denoising_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared noise-prediction error over every element (Ho et al. 2020, L_simple), which is
    the σ²(t)-weighted denoising score-matching loss (see the module docstring)."""
    return F.mse_loss(eps_pred, noise)


def fixed_noise(shape: Sequence[int], seed: int, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One standard-normal image (1, *shape[1:]) from ``seed``, expanded to ``shape``."""
    g = torch.Generator().manual_seed(int(seed))
    one = torch.randn((1, *shape[1:]), generator=g)
    return one.expand(*shape).to(device=device, dtype=dtype).contiguous()


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, noise: torch.Tensor, schedule: VPSchedule, steps: int = 20, eta: float = 0.0,
                generator: Optional[torch.Generator] = None, clip: bool = True) -> torch.Tensor:
    """Run the DDIM sampler from x(1) = ``noise`` to t = 0 on ``steps`` evenly spaced times.

    Each step from t to s < t predicts ε̂ = eps_fn(x_t, t), forms x̂_0 (clamped to [−1, 1] with
    ``clip``), re-derives the noise that x̂_0 implies and moves to
    x_s = √ᾱ(s)·x̂_0 + √(1 − ᾱ(s) − σ²)·ε̂ + σ·z, with
    σ = η·√((1 − ᾱ(s))/(1 − ᾱ(t)))·√(1 − ᾱ(t)/ᾱ(s)).
    The last step lands on ᾱ(0) = 1, i.e. returns x̂_0. Output in model space [−1, 1].
    """
    x = noise
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    batch = x.shape[0]
    for i in range(steps):
        t, s = float(times[i]), float(times[i + 1])
        t_vec = torch.full((batch,), t, device=x.device, dtype=torch.float32)
        eps = eps_fn(x, t_vec).to(x.dtype)
        x0 = schedule.predict_x0(x, t_vec, eps)
        if clip:
            x0 = x0.clamp(-1, 1)
        ab_t = float(schedule.alpha_bar(torch.tensor(t, dtype=torch.float64)))
        ab_s = float(schedule.alpha_bar(torch.tensor(s, dtype=torch.float64)))
        eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(max(1 - ab_t, 1e-12))
        sigma = eta * math.sqrt(max((1 - ab_s) / (1 - ab_t), 0.0) * max(1 - ab_t / ab_s, 0.0))
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
    return x


class DiffusionDecoder(abc.ABC):
    """Mixin for extractors with a code-conditioned diffusion model: ``diffusion_decode`` draws
    images by DDIM from :meth:`conditional_eps` and is offered as the ``"diffusion"`` extra decoder.

    The extractor provides ``options`` (with :class:`DiffusionOptions` and ``image_size``),
    ``schedule`` (a :class:`VPSchedule`) and :meth:`conditional_eps`.
    """

    @abc.abstractmethod
    def conditional_eps(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The noise prediction ε(x_t, t | z) for decoder input z."""

    @torch.no_grad()
    def diffusion_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] drawn from p(x | z) by DDIM; z is the decoder input.
        Every code of one call starts from the same noise image, so a traversal row differs
        only by the code."""
        opts = self.options
        size = opts.image_size
        noise = fixed_noise((len(z), 3, size, size), opts.sample_seed, z.device)
        generator = torch.Generator().manual_seed(opts.sample_seed + 1)
        x = ddim_sample(lambda x_t, t: self.conditional_eps(x_t, t, z), noise, self.schedule, opts.sample_steps,
                        opts.sample_eta, generator)
        return to_image_space(x)

    def extra_decoders(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        return {"diffusion": self.diffusion_decode}


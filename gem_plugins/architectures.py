"""Network bodies shared by the extractors, so baselines differ only in their losses.

The encoder and decoder follow Burgess et al. (2018), "Understanding disentangling in
β-VAE": four 4x4 stride-2 convolutions of 32 channels, two fully connected layers of 256.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def init_weights(module: nn.Module, negative_slope: float = 0.0) -> None:
    """Kaiming initialisation for every conv and linear layer, zero biases.

    PyTorch's default (uniform with a = sqrt(5)) shrinks the signal about threefold per layer;
    over these seven layers the codes of different images start almost identical and the KL
    term collapses the posterior before the encoder learns anything.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=negative_slope, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def check_image_size(image_size: int) -> None:
    """The Burgess networks need image_size to be a power of two >= 16 (raises ValueError otherwise)."""
    if image_size < 16 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two >= 16, got {image_size}")


class BurgessEncoder(nn.Module):
    """x (B, 3, H, W) in [0, 1] -> posterior mean and log-variance, each (B, latent_dim)."""

    def __init__(self, latent_dim: int, image_size: int = 64, channels: int = 32, hidden: int = 256):
        super().__init__()
        check_image_size(image_size)
        layers, in_ch = [], 3
        for _ in range(4):
            layers += [nn.Conv2d(in_ch, channels, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
            in_ch = channels
        self.conv = nn.Sequential(*layers)
        flat = channels * (image_size // 16) ** 2
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, 2 * latent_dim))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.fc(self.conv(x)).chunk(2, dim=1)
        return mu, logvar


class BurgessDecoder(nn.Module):
    """z (B, latent_dim) -> image logits (B, 3, H, W); apply a sigmoid for pixel values."""

    def __init__(self, latent_dim: int, image_size: int = 64, channels: int = 32, hidden: int = 256):
        super().__init__()
        check_image_size(image_size)
        self.channels, self.side = channels, image_size // 16
        self.fc = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels * self.side ** 2), nn.ReLU(inplace=True))
        layers = []
        for i in range(4):
            out_ch = 3 if i == 3 else channels
            layers.append(nn.ConvTranspose2d(channels, out_ch, 4, stride=2, padding=1))
            if i < 3:
                layers.append(nn.ReLU(inplace=True))
        self.deconv = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, self.channels, self.side, self.side)
        return self.deconv(h)


class JointDiscriminator(nn.Module):
    """D(x, z): a logit saying whether the pair came from the encoder or the decoder.

    A small convolutional trunk reads the image, an MLP reads the code, and a joint MLP
    reads both (as in ALI/BiGAN and DEAR's joint discriminator). With ``downsample`` > 1 the
    image is average-pooled by that factor first.
    """

    def __init__(self, latent_dim: int, image_size: int = 64, channels: int = 32, hidden: int = 256,
                 downsample: int = 1):
        super().__init__()
        if downsample < 1 or image_size % downsample:
            raise ValueError(f"disc_downsample must divide image_size {image_size}, got {downsample}")
        self.downsample = downsample
        image_size //= downsample
        check_image_size(image_size)
        layers, in_ch = [], 3
        for _ in range(4):
            layers += [nn.Conv2d(in_ch, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            in_ch = channels
        self.x_net = nn.Sequential(*layers, nn.Flatten(),
                                   nn.Linear(channels * (image_size // 16) ** 2, hidden), nn.LeakyReLU(0.2, inplace=True))
        self.z_net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2, inplace=True))
        self.joint = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.LeakyReLU(0.2, inplace=True), nn.Linear(hidden, 1))
        init_weights(self, negative_slope=0.2)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        return self.joint(torch.cat([self.x_net(x), self.z_net(z)], dim=1)).squeeze(1)

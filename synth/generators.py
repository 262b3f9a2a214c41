"""Image generators for generator-based model inversion.

:class:`DCGANGenerator` is the generator that DAFL, ZSKT, Fast-Datafree and CMI share (a linear layer to a
low-resolution feature map, two nearest-neighbour upsamplings with 3x3 convolutions, BatchNorm and
LeakyReLU). It ends in a sigmoid: images leave it in pixel space [0, 1], and the teacher's own
normalisation (held by :class:`zoo.Classifier`) is applied by the teacher, so a generator never needs to
know it.
"""

from __future__ import annotations

import torch
from torch import nn


class DCGANGenerator(nn.Module):
    """z [N, latent_dim] -> images [N, channels, size, size] in [0, 1]."""

    def __init__(self, latent_dim: int = 256, channels: int = 3, image_size: int = 32, width: int = 64):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"DCGANGenerator needs an image size divisible by 4, got {image_size}")
        self.latent_dim = latent_dim
        self.init_size = image_size // 4
        self.width = width
        self.project = nn.Linear(latent_dim, 2 * width * self.init_size**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(z.shape[0], 2 * self.width, self.init_size, self.init_size)
        return torch.sigmoid(self.body(h))


class ProjectionHead(nn.Module):
    """Two-layer MLP projection head (SimCLR); D2CIP's h_z and h_x, CMI's contrastive head."""

    def __init__(self, in_dim: int, hidden_dim: int = 256, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

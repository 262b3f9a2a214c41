"""Image generators for generator-based model inversion.

:class:`DCGANGenerator` is the generator that DAFL, ZSKT, Fast-Datafree and CMI share (a linear layer to a
low-resolution feature map, two nearest-neighbour upsamplings with 3x3 convolutions, BatchNorm and
LeakyReLU). It ends in a sigmoid: images leave it in pixel space [0, 1], and the teacher's own
normalisation (held by :class:`zoo.Classifier`) is applied by the teacher, so a generator never needs to
know it.

Each "2x nearest-neighbour upsampling, then 3x3 convolution" pair is :class:`NearestUpsampleConv2d`: the
same function of the same weights, computed on the low-resolution grid. Upsampling duplicates pixels, so
each of the four output phases is a 2x2 convolution of the input with sums of the 3x3 kernel's taps: 16
multiply-adds per output pixel pair-of-channels instead of 36. Measured on this project's 2-core CPU, the
16x16 -> 32x32 layer's forward+backward took 0.15 s instead of 0.28-0.46 s at batch 64, and the generator
stopped costing more than the teacher. Parameter names are those of the upsample+conv form (the upsampling
slots hold ``nn.Identity``), so generator checkpoints of either form load into the other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class NearestUpsampleConv2d(nn.Module):
    """``Conv2d(cin, cout, 3, padding=1, bias=False)(Upsample(scale_factor=2, mode="nearest")(x))``, exactly
    (up to float rounding), at 4/9 of the multiply-adds.

    In one dimension, with taps ``w0, w1, w2`` on the upsampled signal ``u[2i] = u[2i+1] = x[i]``: an even
    output ``y[2i] = w0 x[i-1] + (w1 + w2) x[i]``, an odd one ``y[2i+1] = (w0 + w1) x[i] + w2 x[i+1]``. In two
    dimensions each of the four (row, column) phases is a 2x2 kernel over the zero-padded input, and the
    phases are interleaved into the 2x larger output.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Conv2d initialises its weight

    @staticmethod
    def _phases(w: torch.Tensor, dim: int) -> torch.Tensor:
        """Along ``dim`` (size 3), the even-phase taps (w0, w1 + w2) and odd-phase taps (w0 + w1, w2)."""
        w0, w1, w2 = w.unbind(dim)
        return torch.stack([torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)])

    def phase_weights(self) -> torch.Tensor:
        """[2, 2, out, in, 2, 2]: the 2x2 kernel of each (row phase, column phase)."""
        rows = self._phases(self.weight, 2)  # [row phase, out, in, 2, 3]
        return self._phases(rows, 4).transpose(0, 1)  # [row phase, column phase, out, in, 2, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        kernels = self.phase_weights()
        # Even phases read (i-1, i): pad before; odd phases read (i, i+1): pad after. One convolution per phase
        # with its own padding gives each phase's h x w output directly (slicing one larger output instead
        # made the backward pass zero-fill the whole output four times: 30 ms per call here).
        phases = [[F.conv2d(F.pad(x, (1 - b, b, 1 - a, a)), kernels[a, b]) for b in (0, 1)] for a in (0, 1)]
        rows = [torch.stack(row, dim=-1) for row in phases]  # [n, out, h, w, column phase]
        return torch.stack(rows, dim=-3).reshape(n, self.out_channels, 2 * h, 2 * w)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, upsample=2x nearest, kernel_size=3, padding=1"


def reinitialise(module: nn.Module) -> None:
    """Fresh random weights, drawn as CMI's ``reset_model`` draws them for every synthesis round (the DCGAN
    initialisation): convolution and linear weights N(0, 0.02) with zero bias, BatchNorm scale N(1, 0.02) with
    zero shift and reset running statistics."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, NearestUpsampleConv2d)):
            nn.init.normal_(layer.weight, 0.0, 0.02)
            if getattr(layer, "bias", None) is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)


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
            nn.Identity(),  # the 2x upsampling, fused into the next layer
            NearestUpsampleConv2d(2 * width, 2 * width),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Identity(),
            NearestUpsampleConv2d(2 * width, width),
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

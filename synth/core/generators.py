"""Image generators for generator-based model inversion.

:class:`DCGANGenerator` is the generator that DAFL, ZSKT, Fast-Datafree and CMI share (a linear layer to a
low-resolution feature map, two nearest-neighbour upsamplings with 3x3 convolutions, BatchNorm and
LeakyReLU). It ends in a sigmoid: images leave it in pixel space [0, 1], and the teacher's own
normalisation (held by :class:`zoo.Classifier`) is applied by the teacher, so a generator never needs to
know it. :class:`ConditionalDCGANGenerator` is the same network made conditional for CPSC-DFKD: the label at
its input and its BatchNorms replaced by :class:`CategoricalFeatureEmbedding` blocks.

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
from collections.abc import Callable

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
            if layer.affine:
                nn.init.normal_(layer.weight, 1.0, 0.02)
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, CategoricalFeatureEmbedding):
            layer.reset_parameters()


NormLayer = Callable[[int, int], nn.Module]
"""Builds a generator's normalisation layer from (channels, spatial size)."""


def _batch_norm(channels: int, size: int) -> nn.Module:
    return nn.BatchNorm2d(channels)


def dcgan_body(width: int, channels: int, init_size: int, norm_layer: NormLayer = _batch_norm) -> list[nn.Module]:
    """The DCGAN generator's layers after its linear projection, normalisation layers from ``norm_layer``:
    norm, (up+conv), norm, LeakyReLU, (up+conv), norm, LeakyReLU, conv to ``channels``."""
    return [
        norm_layer(2 * width, init_size),
        nn.Identity(),  # the 2x upsampling, fused into the next layer
        NearestUpsampleConv2d(2 * width, 2 * width),
        norm_layer(2 * width, 2 * init_size),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Identity(),
        NearestUpsampleConv2d(2 * width, width),
        norm_layer(width, 4 * init_size),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(width, channels, 3, padding=1),
    ]


def _check_size(image_size: int) -> None:
    if image_size % 4:
        raise ValueError(f"the DCGAN generator needs an image size divisible by 4, got {image_size}")


class DCGANGenerator(nn.Module):
    """z [N, latent_dim] -> images [N, channels, size, size] in [0, 1]."""

    def __init__(self, latent_dim: int = 256, channels: int = 3, image_size: int = 32, width: int = 64):
        super().__init__()
        _check_size(image_size)
        self.latent_dim = latent_dim
        self.init_size = image_size // 4
        self.width = width
        self.project = nn.Linear(latent_dim, 2 * width * self.init_size**2)
        self.body = nn.Sequential(*dcgan_body(width, channels, self.init_size))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(z.shape[0], 2 * self.width, self.init_size, self.init_size)
        return torch.sigmoid(self.body(h))


class CategoricalFeatureEmbedding(nn.Module):
    """CPSC-DFKD's CFE block (papers/cpsc-dfkd.txt, Sec. 3.2): BatchNorm's normalisation without its shared
    affine (gamma_c, beta_c of the paper's Eq. 3), then a class-dependent scale and shift map,

        CFE(x | y) = W_y * (x - mu) / sqrt(sigma^2 + eps) + b_y,    W_y, b_y in R^{d x m}

    Read as d = channels and m = H x W spatial positions: one scale and one shift per channel *and* position
    for every class (the paper calls them feature maps, not vectors). ``per_position=False`` is the lighter
    reading, one scale and shift per class and channel (a class embedding: W_y, b_y in R^d, 1 x 1 maps
    broadcast over positions). Initialised to the identity affine (W = 1, b = 0), as BatchNorm initialises
    gamma and beta, so every class starts from the same generator.
    """

    def __init__(self, channels: int, num_classes: int, size: int, per_position: bool = True):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        side = size if per_position else 1
        self.weight = nn.Parameter(torch.empty(num_classes, channels, side, side))
        self.bias = nn.Parameter(torch.empty(num_classes, channels, side, side))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.weight[labels] + self.bias[labels]


class ConditionalDCGANGenerator(nn.Module):
    """G(z | y): (z [N, latent_dim], labels [N]) -> images [N, channels, size, size] in [0, 1].

    The DCGAN generator with the label at its input (z concatenated with the one-hot label, as the
    conditional GAN of Mirza & Osindero 2014) and its first ``cfe_layers`` normalisation layers (counted from
    the input; ``None``: all three) replaced by :class:`CategoricalFeatureEmbedding`; ``cfe_layers=0`` is the
    plain-BN generator conditioned at the input only; ``cfe_per_position=False`` gives every CFE block
    per-channel maps only (see :class:`CategoricalFeatureEmbedding`).
    """

    num_norm_layers = 3

    def __init__(self, latent_dim: int, num_classes: int, channels: int = 3, image_size: int = 32,
                 width: int = 64, cfe_layers: int | None = None, cfe_per_position: bool = True):
        super().__init__()
        _check_size(image_size)
        cfe_layers = self.num_norm_layers if cfe_layers is None else cfe_layers
        if not 0 <= cfe_layers <= self.num_norm_layers:
            raise ValueError(f"cfe_layers must be between 0 and {self.num_norm_layers}, got {cfe_layers}")
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.init_size = image_size // 4
        self.width = width
        built = 0

        def norm_layer(channels: int, size: int) -> nn.Module:
            nonlocal built
            built += 1
            if built <= cfe_layers:
                return CategoricalFeatureEmbedding(channels, num_classes, size, cfe_per_position)
            return nn.BatchNorm2d(channels)

        self.project = nn.Linear(latent_dim + num_classes, 2 * width * self.init_size**2)
        self.body = nn.Sequential(*dcgan_body(width, channels, self.init_size, norm_layer))

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.num_classes).to(z.dtype)
        h = self.project(torch.cat([z, onehot], dim=1)).view(z.shape[0], 2 * self.width, self.init_size,
                                                              self.init_size)
        for layer in self.body:
            h = layer(h, labels) if isinstance(layer, CategoricalFeatureEmbedding) else layer(h)
        return torch.sigmoid(h)


class ProjectionHead(nn.Module):
    """Two-layer MLP projection head (SimCLR); D2CIP's h_z and h_x, CMI's contrastive head."""

    def __init__(self, in_dim: int, hidden_dim: int = 256, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

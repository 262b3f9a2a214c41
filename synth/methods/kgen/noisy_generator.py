"""NAYER's noisy layer and K-Gen's generator (papers/k-gen.txt, Sec. 3.1 Eq. 1, Alg. 1 line 5, Appendix C.2).

:class:`NoisyLayer` Z maps class representatives f_y [N, D] to generator inputs [N, L]: BatchNorm1d(D), then a
linear map D -> L. It is re-initialised at every iteration (:meth:`NoisyLayer.reinitialise`, the linear
weights drawn N(0, 1) with zero bias as NAYER's ``re_init_le`` draws them) and trained with the generator for
that iteration's g steps; that randomness is where the diversity between batches comes from. As in NAYER's
public generator there is one linear map per *chunk* of ``chunk`` consecutive rows: with ``chunk`` = the number
of classes and labels in round-robin order, no two samples of one class in a batch share a map, so they
differ (with one map for the whole batch, every sample of a class would get the same input and the same
image).

:class:`KGenGenerator` is Table 7: Linear(L -> 128 (h/4)(w/4)), normalisation, reshape, [2x up, spectral-norm
3x3 conv 128->128, BN, LeakyReLU], [2x up, spectral-norm 3x3 conv 128->64, BN, LeakyReLU], spectral-norm 3x3
conv 64->3, sigmoid - the DCGAN body every generator method here shares (:func:`synth.core.generators.dcgan_body`,
its upsample+conv pairs fused) with spectral normalisation on the convolutions. Table 7 ends with a BatchNorm2d
*after* the sigmoid (the public code feeds the teacher normalised tensors); our teachers take pixels in [0, 1]
and normalise themselves, so the generator ends at the sigmoid. One such generator per resolution
(:class:`MultiResolutionGenerator`): its first linear layer's size depends on the resolution (Eq. 7).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrizations

from synth.core.generators import NearestUpsampleConv2d, dcgan_body


class NoisyLayer(nn.Module):
    """Z: BatchNorm1d(in_dim) then one Linear(in_dim, out_dim) per chunk of ``chunk`` rows (at most
    ``max_rows`` rows)."""

    def __init__(self, in_dim: int, out_dim: int, chunk: int, max_rows: int):
        super().__init__()
        if chunk < 1 or max_rows < 1:
            raise ValueError("chunk and max_rows must be positive")
        self.chunk = chunk
        self.chunks = math.ceil(max_rows / chunk)
        self.norm = nn.BatchNorm1d(in_dim)
        self.weight = nn.Parameter(torch.empty(self.chunks, out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(self.chunks, out_dim))
        self.reinitialise()

    @torch.no_grad()
    def reinitialise(self) -> None:
        """Alg. 1 line 5: fresh N(0, 1) linear weights, zero biases, and a fresh BatchNorm."""
        self.norm.reset_parameters()
        self.weight.normal_(0.0, 1.0)
        self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n > self.chunks * self.chunk:
            raise ValueError(f"the noisy layer was built for {self.chunks * self.chunk} rows, got {n}")
        h = self.norm(x)
        k = math.ceil(n / self.chunk)
        padded = torch.nn.functional.pad(h, (0, 0, 0, k * self.chunk - n)).view(k, self.chunk, -1)
        out = torch.baddbmm(self.bias[:k, None, :], padded, self.weight[:k].transpose(1, 2))
        return out.reshape(k * self.chunk, -1)[:n]


def _spectral(module: nn.Module) -> nn.Module:
    return parametrizations.spectral_norm(module)


class KGenGenerator(nn.Module):
    """Table 7: generator inputs [N, latent_dim] -> images [N, channels, size, size] in [0, 1]."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int = 64):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"K-Gen's generator needs a resolution divisible by 4, got {image_size}")
        self.init_size, self.width = image_size // 4, width
        self.project = nn.Linear(latent_dim, 2 * width * self.init_size**2)
        layers = dcgan_body(width, channels, self.init_size)
        self.body = nn.Sequential(*[_spectral(m) if isinstance(m, (nn.Conv2d, NearestUpsampleConv2d)) else m
                                    for m in layers])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(z.shape[0], 2 * self.width, self.init_size, self.init_size)
        return torch.sigmoid(self.body(h))


class MultiResolutionGenerator(nn.Module):
    """One :class:`KGenGenerator` per resolution (Eq. 7), keyed by the resolution."""

    def __init__(self, latent_dim: int, channels: int, resolutions: tuple[int, ...], width: int = 64):
        super().__init__()
        self.resolutions = tuple(resolutions)
        self.by_size = nn.ModuleDict({str(r): KGenGenerator(latent_dim, channels, r, width) for r in resolutions})

    def forward(self, z: torch.Tensor, resolution: int) -> torch.Tensor:
        return self.by_size[str(resolution)](z)


@torch.no_grad()
def reinitialise_generator(module: nn.Module) -> None:
    """Fresh random weights for a generator with spectral-normalised layers (``--reset-generator random``):
    each layer's own initialisation, applied to the *original* weight under a parametrisation."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, NearestUpsampleConv2d)):
            weight = layer.parametrizations.weight.original if hasattr(layer, "parametrizations") else layer.weight
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            if getattr(layer, "bias", None) is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.Linear, nn.modules.batchnorm._BatchNorm)):
            layer.reset_parameters()

"""Latent CutMix (DiffDFKD Eq. 11): random pairs of latents in a batch exchange one random box.

CutMix (Yun et al. 2019) as DiffDFKD applies it to latents: the batch is shuffled into disjoint pairs (with an
odd batch one latent sits out), and for each pair a box is drawn with CutMix's recipe, an area ratio
1 - lambda with lambda ~ Beta(beta, beta) ("random intensity"), aspect equal to the latent's, centre uniform,
clipped to the latent. Both members of a pair swap that box, on every tensor passed in (the latent and the
denoiser's output for it, so the scheduler step of a mixed latent is the mix of the two steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Mix:
    """One exchange: latents ``a`` and ``b`` of the batch swapped the box rows [top, bottom), cols [left, right)."""

    a: int
    b: int
    top: int
    left: int
    bottom: int
    right: int

    @property
    def box(self) -> list[int]:
        return [self.top, self.left, self.bottom, self.right]


def draw_mixes(batch: int, height: int, width: int, beta: float = 1.0,
               generator: torch.Generator | None = None) -> list[Mix]:
    """Random disjoint pairs of ``range(batch)`` and one CutMix box each (possibly empty when lambda is ~1)."""
    order = torch.randperm(batch, generator=generator).tolist()
    lam = _beta(beta, batch // 2, generator) if batch >= 2 else []
    centres = torch.rand(batch // 2, 2, generator=generator).tolist()
    mixes = []
    for pair, (ratio, (cy, cx)) in enumerate(zip(lam, centres, strict=True)):
        cut = (1.0 - ratio) ** 0.5
        h, w = round(height * cut), round(width * cut)
        y, x = cy * height, cx * width
        top, bottom = max(int(round(y - h / 2)), 0), min(int(round(y + h / 2)), height)
        left, right = max(int(round(x - w / 2)), 0), min(int(round(x + w / 2)), width)
        mixes.append(Mix(order[2 * pair], order[2 * pair + 1], top, left, bottom, right))
    return mixes


def _beta(beta: float, n: int, generator: torch.Generator | None) -> list[float]:
    """``n`` draws of Beta(beta, beta) from ``generator`` (torch's global one when None). torch.distributions
    takes no generator, so numpy draws them from a seed that ``generator`` gives."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return np.random.default_rng(seed).beta(beta, beta, size=n).tolist()


def apply_mixes(tensor: torch.Tensor, mixes: list[Mix]) -> torch.Tensor:
    """A copy of ``tensor`` (N x C x H x W) in which each pair of every mix exchanged its box."""
    out = tensor.clone()
    for m in mixes:
        rows, cols = slice(m.top, m.bottom), slice(m.left, m.right)
        out[m.a, :, rows, cols] = tensor[m.b, :, rows, cols]
        out[m.b, :, rows, cols] = tensor[m.a, :, rows, cols]
    return out

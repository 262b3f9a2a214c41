"""The stored pixel format: uint8, exactly what a shard holds and what ``distill`` will train on."""

from __future__ import annotations

import torch


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Pixel-space floats in [0, 1] -> uint8 (round to nearest), same shape and device."""
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8)


def dequantise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]."""
    return pixels.float().div_(255)

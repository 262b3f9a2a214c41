"""Differentiable batch augmentation for synthetic images.

Contrastive views (CMI, D2CIP Eq. 10) and the proxy student's replay need random crops and flips that
run on the whole batch at once, on the batch's device, and let gradients flow back to the generator. One
affine warp per image (``grid_sample``) does random-resized-crop and horizontal flip in a single kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_resized_crop_flip(images: torch.Tensor, scale: tuple[float, float] = (0.25, 1.0),
                             flip: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random crop covering ``scale`` of the area, resized back to full size, and a random flip."""
    n = images.shape[0]
    device = images.device
    rand = torch.rand(n, 4, generator=generator, device="cpu").to(device)
    area = scale[0] + (scale[1] - scale[0]) * rand[:, 0]
    side = area.sqrt()  # square crops: the side relative to the image
    # Crop centre anywhere that keeps the crop inside the image.
    tx = (1 - side) * (2 * rand[:, 1] - 1)
    ty = (1 - side) * (2 * rand[:, 2] - 1)
    sx = side
    if flip:
        sx = torch.where(rand[:, 3] < 0.5, -side, side)
    theta = torch.zeros(n, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = side
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_shift_flip(images: torch.Tensor, max_shift: int = 4, flip: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The CIFAR-style augmentation: a random translation of up to ``max_shift`` pixels and a random flip."""
    n, _, h, w = images.shape
    rand = torch.rand(n, 3, generator=generator, device="cpu").to(images.device)
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = torch.where(rand[:, 2] < 0.5, -1.0, 1.0) if flip else 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = (2 * rand[:, 0] - 1) * (2 * max_shift / w)
    theta[:, 1, 2] = (2 * rand[:, 1] - 1) * (2 * max_shift / h)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)

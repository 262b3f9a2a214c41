"""Differentiable batch augmentation for synthetic images.

Contrastive views (CMI, D2CIP Eq. 10) and the proxy student's replay need random crops and flips that
run on the whole batch at once, on the batch's device, and let gradients flow back to the generator. One
affine warp per image (``grid_sample``) does random-resized-crop and horizontal flip in a single kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_resized_crop_flip(images: torch.Tensor, scale: tuple[float, float] = (0.25, 1.0),
                             flip: bool = True, generator: torch.Generator | None = None,
                             ratio: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """A random crop covering ``scale`` of the area, resized back to full size, and a random flip.

    ``ratio``: the crop's width/height, log-uniform in the range (torchvision's and kornia's (3/4, 4/3), as
    CMI's local view); a side that would leave the image is clipped to it. The default, square crops, draws
    no extra random numbers, so callers that keep it see the same crops as before the option existed."""
    n = images.shape[0]
    device = images.device
    rand = torch.rand(n, 4, generator=generator, device="cpu").to(device)
    area = scale[0] + (scale[1] - scale[0]) * rand[:, 0]
    side_x = side_y = area.sqrt()  # relative to the image's side
    if ratio != (1.0, 1.0):
        low, high = torch.log(torch.tensor(ratio, dtype=torch.float64)).tolist()
        aspect = torch.exp(low + (high - low) * torch.rand(n, generator=generator, device="cpu")).to(device)
        side_x, side_y = (side_x * aspect.sqrt()).clamp(max=1), (side_y / aspect.sqrt()).clamp(max=1)
    # Crop centre anywhere that keeps the crop inside the image.
    tx = (1 - side_x) * (2 * rand[:, 1] - 1)
    ty = (1 - side_y) * (2 * rand[:, 2] - 1)
    sx = side_x
    if flip:
        sx = torch.where(rand[:, 3] < 0.5, -side_x, side_x)
    theta = torch.zeros(n, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = side_y
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


def diff_augment(images: torch.Tensor, translation: float = 0.125, cutout: float = 0.5,
                 generator: torch.Generator | None = None, params: torch.Tensor | None = None) -> torch.Tensor:
    """DiffAugment (Zhao et al., NeurIPS 2020) "color,translation,cutout": per image a random brightness
    (+-0.5), saturation (x0-2) and contrast (x0.5-1.5), a shift of up to ``translation`` of the side (zero
    fill) and one zeroed square of ``cutout`` of the side. Every operation is differentiable in the pixels, so a
    discriminator can see augmented real *and* synthetic images while the generator still gets gradients.
    ``params``: the seven uniform draws, [1, 7] for one augmentation of the whole batch (DM's Siamese
    augmentation: the same parameters on real and synthetic batches of any sizes), else drawn per image."""
    n, _, h, w = images.shape
    device = images.device
    if params is None:
        params = torch.rand(n, 7, generator=generator, device="cpu")
    rand = params.expand(n, 7).to(device, images.dtype)
    x = images + (rand[:, 0] - 0.5).view(n, 1, 1, 1)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (2 * rand[:, 1]).view(n, 1, 1, 1) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (rand[:, 2] + 0.5).view(n, 1, 1, 1) + mean
    theta = torch.zeros(n, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = (2 * rand[:, 3] - 1) * 2 * translation
    theta[:, 1, 2] = (2 * rand[:, 4] - 1) * 2 * translation
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    size_h, size_w = max(1, int(h * cutout + 0.5)), max(1, int(w * cutout + 0.5))
    cy = (rand[:, 5] * (h + 1 - size_h)).long().view(n, 1, 1)
    cx = (rand[:, 6] * (w + 1 - size_w)).long().view(n, 1, 1)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    keep = ~((rows >= cy) & (rows < cy + size_h) & (cols >= cx) & (cols < cx + size_w))
    return x * keep.unsqueeze(1).to(x.dtype)

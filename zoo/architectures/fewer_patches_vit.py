"""A torchvision ViT that takes fewer patches (papers/k-gen.txt, Sec. 3.3 and Appendix A.1): low-resolution images
for a ViT teacher (K-Gen's synthesis) and a ViT student trained on them (``distill``), with centre-biased position
embeddings and the [CLS] token's attention as a key-region map.

A torchvision ViT refuses any input but its training size. :class:`FewerPatchesViT` wraps a torchvision
``VisionTransformer`` so that an e x e image becomes an (e/P) x (e/P) grid of patches (Eq. 12-13: 112 px and
P = 16 give 7 x 7 instead of 14 x 14), and each patch gets the position embedding of a window of the full grid
placed around a centre index p_center drawn with P(p) proportional to 1 / (1 + lambda ||p - c||^2), c the grid's
centre (A.1's "Position Embedding"). At the full size the window is the whole grid: the wrapped ViT's own
forward. The last encoder block also returns its attention weights; the [CLS] query's attention to the
patches, renormalised over the patches and times their number (so that uniform attention is 1 everywhere, the
scale of K-Gen's target masks), is the map K-Gen's L_kr compares with M_target.

Readings where A.1 is garbled or silent: the window is the (e/P) x (e/P) block of position indices centred on
p_center (the offsets "{-P, 0, P}" of A.1 read as a block of neighbours), p_center is drawn per image among
the centres that keep the window inside the grid, lambda = 1; attention is averaged over the heads. With
``random_offsets`` off (K-Gen outside its synthesis steps: the stored logits, the summary) the window is the
central one, deterministically. Here in ``zoo`` because both stages use it: synthesis for a ViT teacher,
distillation for a ViT student on reduced-size shards.
"""

from __future__ import annotations

import torch
from torch import nn


def is_torchvision_vit(network: nn.Module) -> bool:
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    return isinstance(network, VisionTransformer)


def centre_probabilities(grid: int, window: int, steepness: float = 1.0) -> torch.Tensor:
    """[grid, grid] probability of each window centre (top-left + window // 2) that keeps the window inside
    the grid, proportional to 1 / (1 + lambda d^2), d the distance to the grid's centre; 0 elsewhere."""
    index = torch.arange(grid, dtype=torch.float64)
    centre = (grid - 1) / 2
    dist2 = (index[:, None] - centre) ** 2 + (index[None, :] - centre) ** 2
    weight = 1 / (1 + steepness * dist2)
    valid = torch.zeros(grid, dtype=torch.bool)
    valid[window // 2: grid - (window - 1 - window // 2)] = True
    weight = weight * (valid[:, None] & valid[None, :])
    return (weight / weight.sum()).float()


class FewerPatchesViT(nn.Module):
    """A torchvision ViT that takes images of any multiple of its patch size up to its training size."""

    def __init__(self, vit: nn.Module, steepness: float = 1.0, random_offsets: bool = False):
        super().__init__()
        if not is_torchvision_vit(vit):
            raise TypeError(f"FewerPatchesViT wraps a torchvision VisionTransformer, got {type(vit).__name__}")
        self.vit = vit
        self.patch = int(vit.patch_size)
        self.grid = int(vit.image_size) // self.patch
        self.steepness = steepness
        self.random_offsets = random_offsets  # per-image centre-biased windows, or the central one
        self.cls_attention: torch.Tensor | None = None  # [N, h, w] of the last forward pass

    def window_origins(self, n: int, size: int, device: torch.device) -> torch.Tensor:
        """[n, 2] top-left (row, column) of each image's window of ``size`` x ``size`` position indices."""
        if size == self.grid or not self.random_offsets:
            origin = (self.grid - size) // 2
            return torch.full((n, 2), origin, dtype=torch.long, device=device)
        probs = centre_probabilities(self.grid, size, self.steepness).flatten()
        centres = torch.multinomial(probs, n, replacement=True)
        return (torch.stack([centres // self.grid, centres % self.grid], dim=1) - size // 2).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        n, _, height, width = x.shape
        if height != width or height % self.patch or height > self.grid * self.patch:
            raise ValueError(f"the ViT takes square images of a multiple of {self.patch} px up to "
                             f"{self.grid * self.patch}, got {height}x{width}")
        size = height // self.patch
        tokens = vit.conv_proj(x).reshape(n, vit.hidden_dim, size * size).permute(0, 2, 1)
        pos = vit.encoder.pos_embedding  # [1, 1 + grid^2, D]
        grid_pos = pos[0, 1:].reshape(self.grid, self.grid, -1)
        origins = self.window_origins(n, size, x.device)
        rows = origins[:, :1] + torch.arange(size, device=x.device)  # [n, size]
        cols = origins[:, 1:] + torch.arange(size, device=x.device)
        window = grid_pos[rows[:, :, None], cols[:, None, :]].reshape(n, size * size, -1)
        h = torch.cat([(vit.class_token + pos[:, :1]).expand(n, -1, -1), tokens + window], dim=1)
        h = vit.encoder.dropout(h)
        blocks = list(vit.encoder.layers)
        for block in blocks[:-1]:
            h = block(h)
        h, attention = _block_with_attention(blocks[-1], h)
        to_patches = attention[:, 0, 1:]  # the [CLS] query's attention to each patch (its own share left out)
        to_patches = to_patches / to_patches.sum(dim=1, keepdim=True).clamp_min(1e-12)
        self.cls_attention = to_patches.reshape(n, size, size) * (size * size)
        return vit.heads(vit.encoder.ln(h)[:, 0])


def _block_with_attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ``EncoderBlock.forward``, also returning the head-averaged attention weights [N, L, L]."""
    y = block.ln_1(x)
    y, weights = block.self_attention(y, y, y, need_weights=True, average_attn_weights=True)
    x = x + block.dropout(y)
    return x + block.mlp(block.ln_2(x)), weights

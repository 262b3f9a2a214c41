"""K-Gen's embedding-diversity game (papers/k-gen.txt, Sec. 3.4, Eq. 8-11) and the radii it is played with.

The proxy student keeps the embeddings of the memory pool *inside* an inner radius of their class
representative f_y, and the generator makes new data whose student embeddings lie *outside* an outer radius:

    L_ed  = max{0, MSE(f_S(x), f_y) - r_i}        student, on the memory pool              (Eq. 9)
    L_aed = max{0, r_o - MSE(f_S(x), f_y)}        generator, on the batch it makes         (Eq. 11)

Both hinges are taken per sample and then averaged (a batch-level MSE would let a few far samples hide many
near ones). f_S is the student's penultimate feature mapped by :class:`EmbeddingProjection` to the
representatives' size and L2-normalised, so that its MSE to a representative is measured on the same unit
sphere the representatives live on, and the radii below mean the same thing in both places.

Radii (Sec. D.7, Table 14): r_i is half and r_o all of the smallest pairwise MSE between the class
representatives. The paper's 0.015 / 0.03 come from *its* encoder; :func:`derived_radii` computes them from the
representatives actually used (MiniLM on the ten Fashion-MNIST names gives a far smaller minimum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pairwise_mse(representatives: torch.Tensor) -> torch.Tensor:
    """[K, K] mean squared difference between every pair of rows."""
    diff = representatives[:, None, :] - representatives[None, :, :]
    return diff.pow(2).mean(dim=-1)


def smallest_pairwise_mse(representatives: torch.Tensor) -> float:
    """The smallest MSE between two different class representatives."""
    k = representatives.shape[0]
    if k < 2:
        raise ValueError("radii need at least two class representatives")
    distances = pairwise_mse(representatives.double())
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=distances.device)
    return float(distances[off_diagonal].min())


def derived_radii(representatives: torch.Tensor, inner: float = 0.0, outer: float = 0.0) -> tuple[float, float]:
    """(r_i, r_o): a given (positive) radius is kept, a zero one derived - r_i = d_min / 2, r_o = d_min."""
    smallest = smallest_pairwise_mse(representatives) if not (inner > 0 and outer > 0) else 0.0
    r_i = inner if inner > 0 else smallest / 2
    r_o = outer if outer > 0 else smallest
    return r_i, r_o


def per_sample_mse(embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (embeddings - targets.to(embeddings.dtype)).pow(2).mean(dim=1)


def inner_margin_loss(embeddings: torch.Tensor, targets: torch.Tensor, radius: float) -> torch.Tensor:
    """Eq. 9, L_ed: mean over samples of max{0, MSE(e, f_y) - r_i}."""
    return F.relu(per_sample_mse(embeddings, targets) - radius).mean()


def outer_margin_loss(embeddings: torch.Tensor, targets: torch.Tensor, radius: float) -> torch.Tensor:
    """Eq. 11, L_aed: mean over samples of max{0, r_o - MSE(e, f_y)}."""
    return F.relu(radius - per_sample_mse(embeddings, targets)).mean()


class EmbeddingProjection(nn.Module):
    """The student's penultimate feature -> the representatives' space, L2-normalised: a linear map where
    the sizes differ (trained with the proxy student), the identity where they agree."""

    def __init__(self, student_dim: int, representative_dim: int):
        super().__init__()
        self.map: nn.Module = (nn.Identity() if student_dim == representative_dim
                               else nn.Linear(student_dim, representative_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.map(features.float()), dim=1)

"""Latent priors for generator-based inversion.

:class:`ClassConditionalGMM` is D2CIP's distributional prior (Sec. 3.2, Eq. 5-7): for each class y a
mixture of K Gaussians over the generator's latent, with learnable means mu_k^(y), Cholesky factors
L_k^(y) (lower-triangular with a positive diagonal, Sigma = L L^T) and mixture weights pi_k^(y) that are
either learnable or fixed at 1/K. A sample is drawn by the reparameterisation of Eq. 7,

    k ~ Cat(pi^(y)),   z = mu_k^(y) + L_k^(y) eps,   eps ~ N(0, I).

While the prior is trained (stage 1) the categorical draw is relaxed with Gumbel-softmax so that the
weights receive gradients. We use the straight-through form: the forward pass picks exactly one component
(so the samples the generator learns from are true mixture samples, identical in law to the discrete
samples drawn after training), while the backward pass uses the soft relaxation's gradient. The paper
only says "Gumbel-Softmax relaxation"; a soft (non-straight-through) mixture would train the generator on
blends of components that stage 2 never draws.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ClassConditionalGMM(nn.Module):
    """p(z | y) = sum_k pi_k^(y) N(mu_k^(y), L_k^(y) L_k^(y)^T) for y in 0..num_classes-1."""

    def __init__(self, num_classes: int, num_components: int = 5, latent_dim: int = 256,
                 learnable_weights: bool = True, gumbel_temperature: float = 1.0):
        super().__init__()
        if num_components < 1:
            raise ValueError(f"the mixture needs at least one component, got K={num_components}")
        self.num_classes, self.num_components, self.latent_dim = num_classes, num_components, latent_dim
        self.learnable_weights = learnable_weights
        self.gumbel_temperature = gumbel_temperature
        # Components start as unit Gaussians around distinct random centres, so each can specialise.
        self.means = nn.Parameter(torch.randn(num_classes, num_components, latent_dim))
        self.cholesky_offdiagonal = nn.Parameter(torch.zeros(num_classes, num_components, latent_dim, latent_dim))
        self.cholesky_log_diagonal = nn.Parameter(torch.zeros(num_classes, num_components, latent_dim))
        weight_logits = torch.zeros(num_classes, num_components)
        if learnable_weights:
            self.weight_logits = nn.Parameter(weight_logits)
        else:
            self.register_buffer("weight_logits", weight_logits)

    def scale_tril(self, classes: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """L = strictly-lower(offdiag) + diag(exp(log_diag)): lower-triangular, positive diagonal."""
        lower = torch.tril(self.cholesky_offdiagonal[classes], diagonal=-1)
        return lower + torch.diag_embed(self.cholesky_log_diagonal[classes].exp())

    def covariance(self) -> torch.Tensor:
        scale = self.scale_tril()
        return scale @ scale.transpose(-1, -2)

    def mixture_weights(self) -> torch.Tensor:
        """pi [num_classes, K]; uniform 1/K when the weights are fixed."""
        return F.softmax(self.weight_logits, dim=-1)

    def _component_choice(self, labels: torch.Tensor, relaxed: bool) -> torch.Tensor:
        """One-hot component choice [N, K]; differentiable w.r.t. the weights when ``relaxed``."""
        logits = self.weight_logits[labels]
        if relaxed and self.learnable_weights:
            return F.gumbel_softmax(logits, tau=self.gumbel_temperature, hard=True, dim=-1)
        index = torch.distributions.Categorical(logits=logits).sample()
        return F.one_hot(index, self.num_components).to(self.means.dtype)

    def sample(self, labels: torch.Tensor, relaxed: bool = False) -> torch.Tensor:
        """z^(y) for each label (Eq. 7). ``relaxed=True`` during stage-1 training, ``False`` afterwards."""
        choice = self._component_choice(labels, relaxed)
        eps = torch.randn(labels.shape[0], self.latent_dim, device=self.means.device, dtype=self.means.dtype)
        z = torch.empty_like(eps)
        # Per class, every component's reparameterised sample [n_c, K, D], then the (one-hot) mixture of them.
        # Working class by class keeps memory at n_c*K*D instead of N*K*D*D.
        for c in labels.unique().tolist():
            rows = (labels == c).nonzero(as_tuple=True)[0]
            per_component = self.means[c].unsqueeze(0) + torch.einsum("kij,nj->nki", self.scale_tril(c), eps[rows])
            z = z.index_put((rows,), (choice[rows].unsqueeze(-1) * per_component).sum(dim=1))
        return z

    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "num_components": self.num_components,
                "latent_dim": self.latent_dim, "learnable_weights": self.learnable_weights,
                "gumbel_temperature": self.gumbel_temperature}


class StandardNormalPrior(nn.Module):
    """z ~ N(0, I) whatever the label: the plain prior of gMI (D2CIP's "w/o cGMM" ablation)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("_device_anchor", torch.zeros(()))

    def sample(self, labels: torch.Tensor, relaxed: bool = False) -> torch.Tensor:
        return torch.randn(labels.shape[0], self.latent_dim, device=self._device_anchor.device)

    def config(self) -> dict[str, Any]:
        return {"latent_dim": self.latent_dim, "kind": "standard_normal"}

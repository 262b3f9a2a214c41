"""KD from a dataset that mixes synthetic and condensed samples (``synth run METHOD --condensed X``).

The student objective of Condensed Data Expansion Using Model Inversion (AAAI 2026, "Loss & Training"):

    theta_S* = argmin  E_x^[ KL(y^_S || y^_T) ]  +  E_x[ KL(y_S || y_T) ]

two expectations, one over the synthetic samples x^ and one over the condensed samples x. Each is the mean KD
loss over the samples of its kind *in the batch*, so a batch's mix does not reweight the two terms; the weights
(``--synthetic-weight``, ``--condensed-weight``, both 1 as in the paper) scale them. Batches are drawn
uniformly from the mixed set ("random sampling from the mixed set"); the condensed share of every batch is
recorded and reported per epoch (mean, min, max) in ``log.csv`` and ``metrics.json``. A batch without samples
of one kind contributes only the other term. KD is Hinton's, at the run's temperature, as elsewhere in distill.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.core import DistillError, autocast
from distill.data import Batch


def kd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2 for each sample: [N]."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                  reduction="none", log_target=True)
    return kl.sum(1) * (t * t)


class SyntheticCondensedKD:
    """synthetic_weight * E_synthetic[KD] + condensed_weight * E_condensed[KD], from stored logits or a live
    teacher on the student's view."""

    name = "kd-synthetic+condensed"

    def __init__(self, temperature: float, synthetic_weight: float, condensed_weight: float,
                 teacher: nn.Module | None = None, amp: bool = True) -> None:
        if synthetic_weight < 0 or condensed_weight < 0 or synthetic_weight + condensed_weight == 0:
            raise DistillError("--synthetic-weight and --condensed-weight must be >= 0 and not both 0")
        self.temperature = temperature
        self.synthetic_weight = synthetic_weight
        self.condensed_weight = condensed_weight
        self.teacher = teacher.eval() if teacher is not None else None
        self.amp = amp
        self._shares: list[torch.Tensor] = []

    def __call__(self, student_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        if batch.condensed is None:
            raise DistillError("this batch source does not say which samples are condensed")
        if self.teacher is not None:
            with torch.no_grad(), autocast(batch.images.device, self.amp):
                teacher_logits = self.teacher(batch.images).float()
        elif batch.logits is not None:
            teacher_logits = batch.logits
        else:
            raise DistillError("this batch source carries no teacher logits")
        per_sample = kd_per_sample(student_logits, teacher_logits, self.temperature)
        condensed = batch.condensed.to(per_sample.dtype)
        n_condensed = condensed.sum()
        n_synthetic = condensed.numel() - n_condensed
        synthetic_term = (per_sample * (1 - condensed)).sum() / n_synthetic.clamp(min=1)
        condensed_term = (per_sample * condensed).sum() / n_condensed.clamp(min=1)
        self._shares.append((n_condensed / condensed.numel()).detach())  # stays on the device: no sync per step
        return self.synthetic_weight * synthetic_term + self.condensed_weight * condensed_term

    def epoch_stats(self) -> dict[str, Any]:
        """The condensed share of this epoch's batches (mean, min, max); resets for the next epoch."""
        if not self._shares:
            return {}
        shares = torch.stack(self._shares).float().cpu()
        self._shares = []
        return {"condensed_share": float(shares.mean()), "condensed_share_min": float(shares.min()),
                "condensed_share_max": float(shares.max())}

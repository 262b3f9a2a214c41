"""What the student minimises: an *objective* maps (the student's float32 logits, the batch) to a loss.

- **KD** (Hinton): KL(softmax(t/T) ‖ softmax(s/T)) · T², against the logits stored with each image
  (:class:`StoredLogitsKD`) or a live teacher on exactly the view the student sees (:class:`LiveTeacherKD`:
  with ``--augment`` that is Fast's and CMI's regime, augmented views labelled by the teacher on the fly).
- **L_IKD** (CPSC-DFKD, papers/cpsc-dfkd.txt Sec. 3.3): KL(T ‖ S) + α · MSE(S, T) on the logits, the
  output-layer discrepancy the paper's student minimises (:func:`ikd_loss`, :class:`IKD`).
- **L_S = KD + α_ed · L_ed** (K-Gen, papers/k-gen.txt Eq. 8-9): the student's embedding of an image kept
  within r_i of its class representative f_y (:func:`inner_margin_loss`, :class:`EmbeddingDiversityKD`).

Which one a run uses, and with which weights, is decided in :mod:`distill.objective_choice`. The condensed
set's two KD expectations are :mod:`distill.mixed`, DiffDFKD's mSARC :mod:`distill.msarc`.

Readings where the papers leave a choice (the same as the proxy students of ``synth``, so a dataset's
student learns what its in-loop student learnt):

* L_IKD's KL is taken at temperature 1 and its L2 is the mean squared difference per logit, so that α in the
  paper's [3, 7] weighs it against a KL of comparable size.
* L_ed's class y is the teacher's argmax on the image (stored or live logits): the stored label is what the
  generator was *asked* for, the teacher's decision is what the image is. f_S is the student's penultimate
  feature mapped to the representatives' size by a linear layer trained with the student (the identity
  when the sizes agree) and L2-normalised, the same space the representatives and radii live in.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.core import DistillError, autocast
from distill.data import Batch


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD: KL(softmax(t/T) ‖ softmax(s/T)) · T², averaged over the batch (T² keeps the gradient
    scale independent of T)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def ikd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """CPSC-DFKD's L_IKD: KL(softmax(t) ‖ softmax(s)) + ``alpha`` · mean squared logit difference."""
    teacher_logits = teacher_logits.float()
    return kd_loss(student_logits, teacher_logits, 1.0) + alpha * F.mse_loss(student_logits, teacher_logits)


def inner_margin_loss(embeddings: torch.Tensor, targets: torch.Tensor, radius: float) -> torch.Tensor:
    """K-Gen Eq. 9, L_ed: mean over samples of max{0, MSE(e, f_y) - r_i} (per-sample hinge, then the mean)."""
    mse = (embeddings - targets.to(embeddings.dtype)).pow(2).mean(dim=1)
    return F.relu(mse - radius).mean()


class TeacherLogits:
    """The teacher's logits for a batch: those stored with each image, or a live teacher's on the batch's
    (possibly augmented) view, computed without gradients."""

    def __init__(self, teacher: nn.Module | None, amp: bool = True) -> None:
        self.teacher = teacher.eval() if teacher is not None else None
        self.amp = amp
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    @property
    def live(self) -> bool:
        return self.teacher is not None

    def __call__(self, batch: Batch) -> torch.Tensor:
        if self.teacher is not None:
            with torch.no_grad(), autocast(batch.images.device, self.amp):
                return self.teacher(batch.images).float()
        if batch.logits is None:
            raise DistillError("this batch source carries no teacher logits")
        return batch.logits


class StoredLogitsKD:
    """KD against the teacher logits stored with each sample (float16 in the shards, float32 here)."""

    name = "kd-stored-logits"

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.teacher_logits = TeacherLogits(None)

    def __call__(self, student_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return kd_loss(student_logits, self.teacher_logits(batch), self.temperature)


class LiveTeacherKD:
    """KD against a teacher evaluated on exactly the (augmented) view the student sees."""

    name = "kd-live-teacher"

    def __init__(self, teacher: nn.Module, temperature: float, amp: bool) -> None:
        self.temperature = temperature
        self.teacher_logits = TeacherLogits(teacher, amp)
        self.teacher = self.teacher_logits.teacher

    def __call__(self, student_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return kd_loss(student_logits, self.teacher_logits(batch), self.temperature)


class CrossEntropy:
    """Supervised training on the batch's labels."""

    name = "cross-entropy"

    def __call__(self, student_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(student_logits, batch.labels)


class IKD:
    """CPSC-DFKD's student objective L_IKD = KL + α · L2 on the logits, against stored or live logits."""

    def __init__(self, teacher_logits: TeacherLogits, alpha: float) -> None:
        if alpha < 0:
            raise DistillError(f"--ikd-alpha must be >= 0, got {alpha}")
        self.teacher_logits = teacher_logits
        self.alpha = alpha
        self.name = "ikd-" + ("live-teacher" if teacher_logits.live else "stored-logits")

    @property
    def weights(self) -> dict[str, float]:
        return {"alpha": self.alpha}

    def __call__(self, student_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return ikd_loss(student_logits, self.teacher_logits(batch), self.alpha)


class FeatureTap:
    """Keeps the student's penultimate features from its most recent forward pass: the input of the last
    ``nn.Linear`` that ran (hooked on every Linear, since registration order need not be execution order)."""

    def __init__(self, network: nn.Module) -> None:
        linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise DistillError(f"the student ({type(network).__name__}) has no nn.Linear layer, so its penultimate "
                               "features (for the embedding-diversity loss) cannot be located")
        self.features: torch.Tensor | None = None
        self._handles = [m.register_forward_pre_hook(self._grab) for m in linears]

    def _grab(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.features = inputs[0]

    def take(self) -> torch.Tensor:
        if self.features is None:
            raise DistillError("the student ran no nn.Linear layer in this step; no features to embed")
        features, self.features = self.features, None
        return features.flatten(1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class EmbeddingDiversityKD:
    """K-Gen's student objective (Eq. 8): KD at the run's temperature + ``weight`` · L_ed (Eq. 9) with the
    dataset's class representatives and inner radius."""

    def __init__(self, student: nn.Module, teacher_logits: TeacherLogits, temperature: float,
                 representatives: torch.Tensor, inner_radius: float, weight: float) -> None:
        if weight < 0 or inner_radius < 0:
            raise DistillError(f"--ed-weight and --inner-radius must be >= 0, got {weight}, {inner_radius}")
        self.teacher_logits = teacher_logits
        self.temperature = temperature
        self.weight = weight
        self.inner_radius = inner_radius
        self.name = "kgen-ed-" + ("live-teacher" if teacher_logits.live else "stored-logits")
        network = getattr(student, "network", student)
        feature_dim = _feature_dim(student)
        device = next(student.parameters()).device
        self.representatives = F.normalize(representatives.float(), dim=1).to(device)
        dim = int(self.representatives.shape[1])
        self.projection: nn.Module = (nn.Identity() if feature_dim == dim else nn.Linear(feature_dim, dim)).to(device)
        self.tap = FeatureTap(network)
        self._ed: list[torch.Tensor] = []  # this epoch's L_ed per step, on the device: no sync per step

    @property
    def weights(self) -> dict[str, Any]:
        return {"ed_weight": self.weight, "inner_radius": self.inner_radius, "temperature": self.temperature,
                "representatives": list(self.representatives.shape)}

    def parameters(self) -> list[nn.Parameter]:
        """The projection, trained with the student (none when the sizes agree)."""
        return list(self.projection.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"projection": self.projection.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.projection.load_state_dict(state["projection"])

    def epoch_stats(self) -> dict[str, Any]:
        """The epoch's mean L_ed (a ``log.csv`` column); resets for the next epoch."""
        if not self._ed:
            return {}
        mean = float(torch.stack(self._ed).float().mean())
        self._ed = []
        return {"ed_loss": mean}

    def __call__(self, student_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        teacher_logits = self.teacher_logits(batch)
        embedded = F.normalize(self.projection(self.tap.take().float()), dim=1)
        targets = self.representatives[teacher_logits.argmax(dim=1)]
        ed = inner_margin_loss(embedded, targets, self.inner_radius)
        self._ed.append(ed.detach())
        return kd_loss(student_logits, teacher_logits, self.temperature) + self.weight * ed


def _feature_dim(student: nn.Module) -> int:
    dim = getattr(student, "feature_dim", None)
    if isinstance(dim, int) and dim > 0:
        return dim
    linears = [m for m in student.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DistillError("the student has no nn.Linear layer; its feature size is unknown")
    return int(linears[-1].in_features)

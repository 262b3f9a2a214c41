"""Losses shared by the synthesis methods, each named after what it computes.

Every function cites the paper and equation it implements. Methods combine these terms with their own
weights; none of them is written twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .hooks import BatchNormStatisticsHook


def class_prior_loss(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between the teacher's prediction and the asked-for label.

    D2CIP Eq. 1 (the class prior of DAFL, Chen et al. 2019); DeepInversion's L_CE.
    """
    return F.cross_entropy(teacher_logits.float(), labels)  # fp32 under any --precision, as every loss here


def bn_statistics_loss(hook: BatchNormStatisticsHook,
                       synthetic_running: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                       momentum: float = 0.0) -> torch.Tensor:
    """Distance between the batch statistics of the synthetic batch and the teacher's BN statistics.

    D2CIP Eq. 2: sum over BN layers l of ||mu_l(x') - mu_l||_2 + ||sigma^2_l(x') - sigma^2_l||_2, the
    feature-distribution regulariser of DeepInversion (Yin et al. 2020, Eq. 4) as CMI uses it. ``hook``
    must have recorded exactly one teacher forward pass.

    With ``synthetic_running`` (per layer, a running estimate of earlier synthetic batches' mean and
    variance) the batch's statistics are first blended with it, ``(1 - m) * batch + m * running``: Fast's
    momentum feature regulariser (Fang et al. 2022), which matches the statistics of the synthetic data seen
    so far rather than of one small batch.
    """
    if not hook.batch_stats:
        raise RuntimeError("bn_statistics_loss needs a teacher forward pass inside hook.recording()")
    if len(hook.batch_stats) != len(hook.layers):
        raise RuntimeError(
            f"recorded {len(hook.batch_stats)} BN activations for {len(hook.layers)} layers; "
            "run exactly one teacher forward pass per recording"
        )
    stats = hook.batch_stats
    if synthetic_running is not None:
        stats = [((1 - momentum) * mean + momentum * run_mean, (1 - momentum) * var + momentum * run_var)
                 for (mean, var), (run_mean, run_var) in zip(stats, synthetic_running, strict=True)]
    total = stats[0][0].new_zeros(())
    for (mean, var), (running_mean, running_var) in zip(stats, hook.running_stats(), strict=True):
        total = total + torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)
    return total


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0,
                  reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), per sample when ``reduction='none'``."""
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    per_sample = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    if reduction == "none":
        return per_sample
    return per_sample.mean()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Hinton et al. (2015) knowledge distillation: T^2 * KL(teacher || student) at temperature T."""
    return kl_divergence(teacher_logits, student_logits, temperature) * temperature**2


def adversarial_kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0,
                        decision_adversarial: bool = False, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Negative teacher-student disagreement, minimised by the generator to find hard samples.

    D2CIP Eq. 3: L_adv = -KL(theta_T(x'), theta_S(x')) (Fang et al. 2019). With
    ``decision_adversarial=True`` it is D2CIP Eq. 15 (CMI's variant): only samples on which teacher and
    student agree on the class contribute, so the generator is pushed towards the decision boundary
    without being rewarded for samples the teacher itself would label differently. Given ``labels`` (a
    conditional generator's asked classes) that class must be the asked one: a sample whose teacher class
    has left the asked class stops being pushed further away.
    """
    per_sample = kl_divergence(teacher_logits, student_logits, temperature, reduction="none")
    if decision_adversarial:
        teacher_class = teacher_logits.argmax(dim=1)
        agree = teacher_class == student_logits.argmax(dim=1)
        if labels is not None:
            agree = agree & (teacher_class == labels)
        per_sample = per_sample * agree.to(per_sample.dtype)
    return -per_sample.mean()


def total_variation_loss(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anisotropic total variation of a batch, as (L1 form, L2 form).

    DeepInversion's image prior R_TV (Yin et al. 2020, Eq. 3; Mahendran & Vedaldi 2015): mean absolute
    and mean squared differences between neighbouring pixels.
    """
    images = images.float()  # a generator under autocast hands over bf16/fp16 pixels
    dh = images[:, :, 1:, :] - images[:, :, :-1, :]
    dw = images[:, :, :, 1:] - images[:, :, :, :-1]
    tv_l1 = dh.abs().mean() + dw.abs().mean()
    tv_l2 = dh.pow(2).mean() + dw.pow(2).mean()
    return tv_l1, tv_l2


def image_l2_loss(images: torch.Tensor) -> torch.Tensor:
    """DeepInversion's R_l2 image prior: the mean squared L2 norm of each image (Yin et al. 2020, Eq. 3)."""
    return images.float().flatten(1).pow(2).sum(dim=1).mean()


def info_nce_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
                  temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE with in-batch and memory-bank negatives, on cosine similarity.

    D2CIP Eq. 9-10 (and CMI's L_cr): for anchor i, the positive is ``positives[i]`` (another view of the
    same instance), the negatives are every other instance's positive view in the batch plus every row
    of ``negatives`` (the memory bank of earlier batches). Eq. 10 writes the denominator over negatives
    only; we use the usual softmax cross-entropy form, whose denominator also holds the positive (as
    SimCLR and CMI do): it is bounded below by 0 and numerically stable, and it orders solutions the same.
    """
    anchors = F.normalize(anchors.float(), dim=1)
    candidates = F.normalize(positives.float(), dim=1)
    if negatives is not None and negatives.numel() > 0:
        candidates = torch.cat([candidates, F.normalize(negatives.float(), dim=1)], dim=0)
    logits = anchors @ candidates.t() / temperature
    targets = torch.arange(anchors.shape[0], device=anchors.device)
    return F.cross_entropy(logits, targets)


def logit_discrepancy_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                           l2_weight: float) -> torch.Tensor:
    """CPSC-DFKD's L_IKD (papers/cpsc-dfkd.txt, Sec. 3.3): KL(teacher || student) + alpha * L2 of the logits.

    The L2 part is the mean squared difference of the logits (per logit, averaged over the batch), so that
    alpha in the paper's recommended [3, 7] weighs it against a KL of comparable size. The proxy student
    minimises this discrepancy; the generator maximises it.
    """
    return kl_divergence(teacher_logits, student_logits) + l2_weight * F.mse_loss(student_logits.float(),
                                                                                  teacher_logits.float())


def supervised_contrastive_loss(anchors: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor,
                                temperature: float = 0.07) -> torch.Tensor:
    """CPSC-DFKD's L_SCL (Sec. 3.5), the supervised contrastive loss of Khosla et al. (2020, Eq. 2, L_out)
    across two views.

    Anchor i is ``anchors[i]`` (the teacher's penultimate feature of image i); the candidates are every
    image's other view (the student's feature, mapped to the teacher's size). The positives of anchor i are
    the candidates of every sample with its label (its own student view included), the rest are negatives:

        L = -mean_i 1/|P(i)| sum_{p in P(i)} log( exp(a_i . c_p / tau) / sum_k exp(a_i . c_k / tau) )

    on L2-normalised features.
    """
    a = F.normalize(anchors.float(), dim=1)
    c = F.normalize(candidates.float(), dim=1)
    log_prob = (a @ c.t() / temperature).log_softmax(dim=1)
    positives = (labels[:, None] == labels[None, :]).to(log_prob.dtype)
    return -((log_prob * positives).sum(dim=1) / positives.sum(dim=1)).mean()

"""mSARC: the student's class activation maps follow the teacher's, stage by stage (DiffDFKD Eq. 12, after
SpaceshipNet's multi-scale spatial activation region constraint).

``distill run --teacher T --msarc-weight LAMBDA`` trains the student on

    L = L_KL(student, teacher) + LAMBDA * L_mSARC,      L_mSARC = mean over stage pairs (i_l, j_l) of
        mean over the batch of || CAM_S^{i_l}(x) - CAM_T^{j_l}(x) ||^2

(Eq. 12 writes the weights the other way round, lambda_KL on L_mSARC and lambda_mSARC on L_KL, an evident
swap; here KD keeps weight 1 as in every other distill run and LAMBDA weighs the new term.)

Readings where the paper is silent, and why:

* CAM of an *intermediate* stage: the original CAM (Zhou et al. 2016) exists only at the last convolution (it
  weighs channels with the classifier's weights), so every stage uses its gradient form, Grad-CAM (Selvaraju et
  al. 2017): channel weights = spatial mean of d logit_c / d F, map = ReLU(sum_k w_k F_k). The class c is the
  teacher's prediction on the image, for both networks (the region that makes the *teacher* decide).
* Each map is L2-normalised per sample (scale-free: a student's features need not match the teacher's in
  magnitude, only where they activate) and the student's is resized to the teacher's stage resolution.
* The student's maps are differentiated with ``create_graph=True``, so L_mSARC trains the student's weights
  (one extra backward pass through the student per step); the teacher's are constants.
* Stage pairs: the stages of a zoo network are its residual / VGG blocks (``layer1..4``, ``block1..3``,
  ``block0..4``), MobileNetV2's ``blocks`` and ``conv2``, LeNet-5's three convolutions; the deepest
  min(#student, #teacher) stages of each are paired in order, deepest with deepest.
  ``--msarc-stages S1,S2:T1,T2`` names the modules (dotted paths) for any other network.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.core import DistillError, autocast
from distill.data import Batch
from distill.objectives import kd_loss

_STAGE = re.compile(r"^(layer|block)\d+$")


def default_stages(network: nn.Module) -> list[str]:
    """The stage modules of a zoo (or torchvision ResNet) network, shallow to deep."""
    children = [name for name, _ in network.named_children()]
    stages = [name for name in children if _STAGE.match(name)]
    if stages:
        return stages
    if {"blocks", "conv2"} <= set(children):  # MobileNetV2
        return ["blocks", "conv2"]
    if {"conv1", "conv2", "conv3"} <= set(children):  # LeNet-5
        return ["conv1", "conv2", "conv3"]
    raise DistillError(f"cannot tell the stages of {type(network).__name__} for mSARC; name them with "
                       "--msarc-stages STUDENT_MODULES:TEACHER_MODULES (comma-separated dotted module paths)")


def stage_pairs(student: nn.Module, teacher: nn.Module, spec: str | None = None) -> list[tuple[str, str]]:
    """(student module, teacher module) pairs: from ``spec`` ("s1,s2:t1,t2") or the deepest stages of each."""
    if spec:
        try:
            left, right = spec.split(":")
        except ValueError:
            raise DistillError(f"--msarc-stages must be STUDENT_MODULES:TEACHER_MODULES, got {spec!r}") from None
        s_names, t_names = [n.strip() for n in left.split(",")], [n.strip() for n in right.split(",")]
        if len(s_names) != len(t_names):
            raise DistillError(f"--msarc-stages pairs {len(s_names)} student stages with {len(t_names)} teacher ones")
    else:
        s_names, t_names = default_stages(student), default_stages(teacher)
        n = min(len(s_names), len(t_names))
        s_names, t_names = s_names[-n:], t_names[-n:]
    for network, names, who in ((student, s_names, "student"), (teacher, t_names, "teacher")):
        modules = dict(network.named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            raise DistillError(f"the {who} has no module {missing[0]!r} (for --msarc-stages)")
    return list(zip(s_names, t_names, strict=True))


class StageRecorder:
    """Keeps the output of each named module of ``network`` from the most recent forward pass."""

    def __init__(self, network: nn.Module, names: list[str]):
        modules = dict(network.named_modules())
        self.names = names
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self.outputs[name] = output
        return record

    def features(self) -> list[torch.Tensor]:
        return [self.outputs[name] for name in self.names]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def grad_cam(logits: torch.Tensor, features: list[torch.Tensor], classes: torch.Tensor,
             create_graph: bool) -> list[torch.Tensor]:
    """Grad-CAM of ``classes`` at each feature map: ReLU(sum_k mean_hw(d logit_c / d F_k) F_k), each map
    L2-normalised per sample; [N, H, W] per feature."""
    score = logits.float().gather(1, classes[:, None]).sum()
    grads = torch.autograd.grad(score, features, create_graph=create_graph)
    maps = []
    for feature, grad in zip(features, grads, strict=True):
        weights = grad.float().mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * feature.float()).sum(dim=1))
        maps.append(cam / cam.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None])
    return maps


def cam_alignment_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """Mean over stage pairs of the per-sample squared L2 distance of the maps (student resized to teacher)."""
    total = student_maps[0].new_zeros(())
    for s, t in zip(student_maps, teacher_maps, strict=True):
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s[:, None], size=t.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        total = total + (s - t.detach()).pow(2).flatten(1).sum(dim=1).mean()
    return total / len(student_maps)


class MSARCKD:
    """KD from a live teacher on the student's view plus ``weight`` * L_mSARC (Eq. 12)."""

    name = "kd-live-teacher+msarc"

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float, weight: float,
                 stages: str | None = None, amp: bool = True):
        student_net = getattr(student, "network", student)
        teacher_net = getattr(teacher, "network", teacher)
        self.pairs = stage_pairs(student_net, teacher_net, stages)
        self.student_stages = StageRecorder(student_net, [s for s, _ in self.pairs])
        self.teacher_stages = StageRecorder(teacher_net, [t for _, t in self.pairs])
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.weight = weight
        self.amp = amp
        self.last_msarc = 0.0

    def __call__(self, student_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        images = batch.images.detach().requires_grad_(True)  # so the teacher's stages are in a graph
        with torch.enable_grad(), autocast(images.device, self.amp):
            teacher_logits = self.teacher(images).float()
        classes = teacher_logits.argmax(dim=1)
        teacher_maps = [m.detach() for m in grad_cam(teacher_logits, self.teacher_stages.features(), classes,
                                                     create_graph=False)]
        student_maps = grad_cam(student_logits, self.student_stages.features(), classes, create_graph=True)
        msarc = cam_alignment_loss(student_maps, teacher_maps)
        self.last_msarc = float(msarc.detach())
        return kd_loss(student_logits, teacher_logits.detach(), self.temperature) + self.weight * msarc

"""Generator-based model inversion (gMI): the baseline every newer generator method extends.

Implements the general gMI framework as D2CIP (Sec. 3.1) summarises it:

    L_gMI = alpha * L_cls + beta * L_bn + gamma * L_adv                                  (D2CIP Eq. 4)

with the class prior L_cls (Eq. 1), BN-statistics matching L_bn (Eq. 2) and the adversarial term
L_adv = -KL(theta_T(x'), theta_S(x')) (Eq. 3) against an in-loop *proxy student*. As in CMI and Fast, a
generator and per-batch learnable latents are optimised for ``inversion_steps`` steps; the finished batch
joins a memory bank of earlier batches from which the proxy student is trained by KD after each batch.

Extension points, so that D2CIP, CPSC-DFKD, K-Gen and the condensed-data discriminator add or swap terms
without copying this loop:

* :meth:`GMI.build_generator`    - the generator architecture;
* :meth:`GMI.sample_latents`     - the latent prior (N(0, I) here; D2CIP's class-conditional GMM);
* :meth:`GMI.begin_batch`        - per-batch set-up (re-initialising the generator, heads, optimisers);
* :meth:`GMI.inversion_losses`   - the named, weighted loss terms of one step (add a key to add a term);
* :meth:`GMI.update_losses`      - which sum of terms updates which parameter group (D2CIP Eq. 13/14);
* :meth:`GMI.train_proxy_student` - how the proxy student learns from the replayed batches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import zoo

from . import augment
from .base import SynthBatch, SynthConfig, SynthesisMethod, register
from .generators import DCGANGenerator
from .hooks import BatchNormStatisticsHook, recording
from .losses import adversarial_kl_loss, bn_statistics_loss, class_prior_loss, distillation_loss
from .memory import MemoryBank


@dataclass
class GMIConfig(SynthConfig):
    """gMI hyperparameters. Defaults follow CMI's CIFAR settings, which D2CIP Table 12 also uses."""

    inversion_steps: int = field(default=200, metadata={
        "help": "optimisation steps of generator and latents per batch"})
    latent_dim: int = field(default=256, metadata={"help": "size of the generator's latent vector z"})
    generator_width: int = field(default=64, metadata={"help": "base channel width of the generator"})
    generator_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the generator"})
    latent_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the latent vectors"})
    class_weight: float = field(default=1.0, metadata={"help": "alpha: weight of the class prior L_cls (Eq. 1)"})
    bn_weight: float = field(default=1.0, metadata={"help": "beta: weight of BN-statistics matching L_bn (Eq. 2)"})
    adv_weight: float = field(default=0.5, metadata={"help": "gamma: weight of the adversarial term L_adv (Eq. 3)"})
    decision_adversarial: bool = field(default=False, metadata={
        "help": "restrict L_adv to samples where teacher and proxy student agree (D2CIP Eq. 15)"})
    augment_views: bool = field(default=True, metadata={
        "help": "show the teacher a random crop/flip of each image during inversion (as CMI does)"})
    reset_generator: bool = field(default=False, metadata={"help": "re-initialise the generator for every batch"})
    proxy_student: str = field(default="wrn16_1", metadata={"help": "architecture of the in-loop proxy student"})
    proxy_lr: float = field(default=0.1, metadata={"help": "SGD learning rate of the proxy student"})
    kd_steps: int = field(default=5, metadata={"help": "proxy-student KD steps after each batch"})
    kd_temperature: float = field(default=4.0, metadata={"help": "temperature of the proxy student's KD loss"})
    memory_capacity: int = field(default=8192, metadata={"help": "images kept for replay to the proxy student"})

    def __post_init__(self) -> None:
        for name in ("batch_size", "inversion_steps", "latent_dim", "generator_width", "memory_capacity"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kd_steps < 0:
            raise ValueError(f"kd_steps must be >= 0, got {self.kd_steps}")


@dataclass
class InversionStep:
    """What one optimisation step computed, handed to :meth:`GMI.inversion_losses`."""

    labels: torch.Tensor
    latents: torch.Tensor
    images: torch.Tensor  # generator output, pixel space
    views: torch.Tensor  # what the teacher saw (augmented images)
    teacher_logits: torch.Tensor
    teacher_features: torch.Tensor
    student_logits: torch.Tensor | None


@register
class GMI(SynthesisMethod):
    name = "gmi"
    summary = "generator-based model inversion: class prior + BN statistics + adversarial KL (D2CIP Eq. 1-4)"
    config_class = GMIConfig
    config: GMIConfig

    def __init__(self, teacher: zoo.Classifier, config: GMIConfig, device: torch.device):
        super().__init__(teacher, config, device)
        self.teacher.eval().requires_grad_(False)
        self.num_classes = teacher.num_classes
        self.channels, self.height, self.width = teacher.input_shape
        self.bn_hook = BatchNormStatisticsHook(teacher.network) if config.bn_weight > 0 else None
        self.generator = self.build_generator().to(device)
        self.initial_generator_state = copy.deepcopy(self.generator.state_dict())
        self.student = self.build_proxy_student().to(device)
        self.student_optimizer = torch.optim.SGD(self.student.parameters(), lr=config.proxy_lr, momentum=0.9,
                                                 weight_decay=5e-4)
        self.memory = MemoryBank(config.memory_capacity)
        self.batches_done = 0
        self.last_losses: dict[str, float] = {}

    # -- extension points -------------------------------------------------------------------------------

    def build_generator(self) -> nn.Module:
        if self.height != self.width:
            raise ValueError(f"the DCGAN generator makes square images; the teacher expects {self.height}x{self.width}")
        return DCGANGenerator(self.config.latent_dim, self.channels, self.height, self.config.generator_width)

    def build_proxy_student(self) -> nn.Module:
        network = zoo.build_model(self.config.proxy_student, self.num_classes, self.channels)
        return zoo.Classifier(network, self.teacher.mean.flatten().tolist(), self.teacher.std.flatten().tolist())

    def sample_latents(self, labels: torch.Tensor) -> torch.Tensor:
        """The latent prior: z ~ N(0, I), independent of the label."""
        return torch.randn(labels.shape[0], self.config.latent_dim, device=self.device)

    def next_labels(self) -> torch.Tensor:
        """Classes in round-robin order, so every class gets the same share of the dataset."""
        start = self.batches_done * self.config.batch_size
        labels = (torch.arange(self.config.batch_size) + start) % self.num_classes
        return labels.to(self.device)

    def begin_batch(self, labels: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Prepares a batch and returns the parameter groups to optimise, by name."""
        if self.config.reset_generator:
            self.generator.load_state_dict(self.initial_generator_state)
        self.latents = self.sample_latents(labels).detach().requires_grad_(True)
        return {"generator": list(self.generator.parameters()), "latents": [self.latents]}

    def build_optimizers(self, groups: dict[str, list[torch.Tensor]]) -> dict[str, torch.optim.Optimizer]:
        lrs = {"generator": self.config.generator_lr, "latents": self.config.latent_lr}
        # One Adam per group and per batch, as CMI re-creates its optimiser for each synthesis round.
        return {name: torch.optim.Adam(params, lr=lrs.get(name, self.config.generator_lr), betas=(0.5, 0.999))
                for name, params in groups.items()}

    #: Overall weight of L_gMI among a method's terms (D2CIP's lambda2); 1 in plain gMI.
    gmi_scale: float = 1.0

    def inversion_losses(self, step: InversionStep) -> dict[str, torch.Tensor]:
        """The weighted terms of L_gMI (Eq. 4). A term with weight 0 is absent from the dictionary."""
        cfg = self.config
        losses: dict[str, torch.Tensor] = {}
        if cfg.class_weight:
            losses["cls"] = self.gmi_scale * cfg.class_weight * class_prior_loss(step.teacher_logits, step.labels)
        if cfg.bn_weight:
            losses["bn"] = self.gmi_scale * cfg.bn_weight * bn_statistics_loss(self.bn_hook)
        if cfg.adv_weight and step.student_logits is not None:
            losses["adv"] = self.gmi_scale * cfg.adv_weight * adversarial_kl_loss(
                step.teacher_logits, step.student_logits, decision_adversarial=cfg.decision_adversarial)
        return losses

    def update_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Which loss updates which parameter group: in gMI, every term updates everything."""
        total = sum(losses.values())
        return {"generator": total, "latents": total}

    def teacher_view(self, images: torch.Tensor) -> torch.Tensor:
        return augment.random_resized_crop_flip(images, scale=(0.5, 1.0)) if self.config.augment_views else images

    def train_proxy_student(self) -> None:
        """KD of the proxy student on batches replayed from the memory bank (CMI's KD phase)."""
        if self.config.kd_steps == 0 or len(self.memory) == 0:
            return
        self.student.train()
        for _ in range(self.config.kd_steps):
            images = augment.random_shift_flip(self.memory.sample(self.config.batch_size))
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            loss = distillation_loss(self.student(images), teacher_logits, self.config.kd_temperature)
            self.student_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.student_optimizer.step()
        self.student.eval()

    # -- the loop ----------------------------------------------------------------------------------------

    def invert_batch(self, labels: torch.Tensor) -> torch.Tensor:
        """Optimises one batch; returns the final images (detached, pixel space)."""
        groups = self.begin_batch(labels)
        optimizers = self.build_optimizers(groups)
        needs_student = self.config.adv_weight > 0 and self.batches_done > 0
        self.student.eval()
        for _ in range(self.config.inversion_steps):
            images = self.generator(self.latents)
            step = self.forward_step(labels, images, needs_student)
            losses = self.inversion_losses(step)
            self.apply_updates(losses, groups, optimizers)
        with torch.no_grad():
            return self.generator(self.latents).detach()

    def forward_step(self, labels: torch.Tensor, images: torch.Tensor, needs_student: bool) -> InversionStep:
        views = self.teacher_view(images)
        with recording(self.bn_hook):
            teacher_logits, teacher_features = self.teacher.forward_with_features(views)
        student_logits = self.student(views) if needs_student else None
        return InversionStep(labels, self.latents, images, views, teacher_logits, teacher_features, student_logits)

    def apply_updates(self, losses: dict[str, torch.Tensor], groups: dict[str, list[torch.Tensor]],
                      optimizers: dict[str, torch.optim.Optimizer]) -> None:
        """Each group gets the gradient of its own loss (Eq. 13/14), even when the losses differ."""
        per_group = self.update_losses(losses)
        # Groups that share one loss tensor share one backward pass.
        by_loss: dict[int, list[str]] = {}
        for name, loss in per_group.items():
            by_loss.setdefault(id(loss), []).append(name)
        batches = list(by_loss.values())
        for i, names in enumerate(batches):
            params = [p for name in names for p in groups[name]]
            grads = torch.autograd.grad(per_group[names[0]], params, retain_graph=i < len(batches) - 1,
                                        allow_unused=True)
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
        for name in per_group:
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        self.last_losses = {key: float(value.detach()) for key, value in losses.items()}

    def synthesize(self) -> Iterator[SynthBatch]:
        while True:
            labels = self.next_labels()
            images = self.invert_batch(labels)
            self.memory.push(images)
            self.train_proxy_student()
            self.batches_done += 1
            yield SynthBatch(images, labels)

    # -- resumability ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.state_dict(),
            "student": self.student.state_dict(),
            "student_optimizer": self.student_optimizer.state_dict(),
            "memory": self.memory.state_dict(),
            "batches_done": self.batches_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.student.load_state_dict(state["student"])
        self.student_optimizer.load_state_dict(state["student_optimizer"])
        self.memory.load_state_dict(state["memory"], device=self.device)
        self.batches_done = int(state["batches_done"])

    def losses_of_last_step(self) -> dict[str, float]:
        return self.last_losses

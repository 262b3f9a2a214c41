"""A proxy student trained inside a synthesis loop, for the adversarial term L_adv (CMI, Fast, DiffDFKD).

It learns by KD from the teacher on images replayed from a memory of stored (quantised) samples, so that
L_adv = -KL(teacher || student) has something to disagree with. Methods on :mod:`synth.core.inversion` have this
built in; methods with a loop of their own (DiffDFKD) use this class.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import zoo

from . import augment
from .losses import distillation_loss
from .memory import MemoryBank
from .pixels import dequantise, quantise


def scheduled_lr(base: float, schedule: str, step: int, total: int, floor: float = 2e-4) -> float:
    """The proxy student's learning rate after ``step`` scheduler steps: ``constant`` keeps ``base``; ``cosine``
    is torch's ``CosineAnnealingLR(T_max=total, eta_min=floor)`` in closed form (Fast-Datafree's student
    schedule: T_max 200 epochs, eta_min 2e-4, one step per synthesised batch), computed from the step count so
    that a resumed run needs no scheduler state."""
    if schedule == "constant":
        return base
    if schedule != "cosine":
        raise ValueError(f"unknown proxy schedule {schedule!r}; choose constant or cosine")
    return floor + (base - floor) * (1 + math.cos(math.pi * step / max(total, 1))) / 2


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group of ``optimizer`` at learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class ProxyStudent:
    """A zoo network with the teacher's normalisation, its SGD optimiser and its replay memory."""

    def __init__(self, teacher: zoo.Classifier, arch: str, device: torch.device, lr: float = 0.1,
                 capacity: int = 8192, temperature: float = 4.0):
        network = zoo.build_model(arch, teacher.num_classes, teacher.input_shape[0])
        self.teacher = teacher
        self.model = zoo.Classifier(network, teacher.mean.flatten().tolist(), teacher.std.flatten().tolist()).to(device)
        self.model.eval()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        self.memory = MemoryBank(capacity)
        self.temperature = temperature

    @property
    def has_learnt(self) -> bool:
        return len(self.memory) > 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def learn(self, images: torch.Tensor, steps: int, batch_size: int) -> None:
        """Stores ``images`` (pixel space) in the memory, then ``steps`` KD steps on replayed batches."""
        if steps <= 0:
            return
        self.memory.push(quantise(images))
        self.model.train()
        for _ in range(steps):
            replay = augment.random_shift_flip(dequantise(self.memory.sample(batch_size)))
            with torch.no_grad():
                target = self.teacher(replay).float()
            loss = distillation_loss(self.model(replay).float(), target, self.temperature)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.model.eval()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.memory.load_state_dict(state["memory"], device=device)

"""The options every generator-based method shares (:class:`InversionConfig`), those of the methods whose proxy
student is trained as the Fast-Datafree reference trains its student (:class:`ReferenceStudentConfig`: CMI, Fast),
and what ``--reset-generator`` may say (:data:`ResetMode`); the loop that reads them is
:mod:`synth.core.inversion`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .protocol import SynthConfig
from .proxy import scheduled_lr

ResetMode = Literal["auto", "keep", "initial", "random"]


@dataclass
class InversionConfig(SynthConfig):
    """Options of every generator-based method. Defaults follow CMI's CIFAR settings (D2CIP Table 12)."""

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
    reset_generator: ResetMode = field(default="auto", metadata={
        "help": "generator at the start of each batch: keep (persists across batches), initial (the weights the "
                "run started from), random (fresh random weights, as CMI), auto (the method's choice)"})
    proxy_student: str = field(default="wrn16_1", metadata={"help": "architecture of the in-loop proxy student"})
    proxy_lr: float = field(default=0.1, metadata={"help": "SGD learning rate of the proxy student"})
    kd_steps: int = field(default=5, metadata={"help": "proxy-student KD steps after each stored batch"})
    kd_temperature: float = field(default=4.0, metadata={"help": "temperature of the proxy student's KD loss"})
    memory_capacity: int = field(default=8192, metadata={"help": "images kept for replay to the proxy student"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("inversion_steps", "latent_dim", "generator_width", "memory_capacity"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kd_steps < 0:
            raise ValueError(f"kd_steps must be >= 0, got {self.kd_steps}")


@dataclass
class ReferenceStudentConfig(InversionConfig):
    """The proxy student trained as the public Fast-Datafree code (CMI's and Fast's) trains its student between
    synthesised batches: 400 KD steps at T = 20, SGD whose learning rate is cosine-annealed to 2e-4 over 200
    batches. Each method's ``cpu_budget`` cuts these (see its module docstring)."""

    kd_steps: int = field(default=400, metadata={
        "help": "proxy-student KD steps after each stored batch (the reference's kd_steps: 400)"})
    kd_temperature: float = field(default=20.0, metadata={"help": "temperature of the proxy student's KD loss"})
    proxy_lr: float = field(default=0.1, metadata={"help": "SGD learning rate of the proxy student (at its start)"})
    proxy_schedule: Literal["constant", "cosine"] = field(default="cosine", metadata={
        "help": "proxy lr over the run: cosine to 2e-4 over --proxy-schedule-batches stored batches (Fast: after "
                "its warm-up), as the reference's student; or constant"})
    proxy_schedule_batches: int = field(default=200, metadata={"help": "T_max of the cosine proxy schedule"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.proxy_schedule_batches < 1:
            raise ValueError(f"proxy_schedule_batches must be positive, got {self.proxy_schedule_batches}")

    def proxy_lr_after(self, batches: int) -> float:
        """The proxy student's learning rate after ``batches`` scheduler steps (one per stored batch)."""
        return scheduled_lr(self.proxy_lr, self.proxy_schedule, batches, self.proxy_schedule_batches)

"""Fast: a meta-learned generator that synthesises a batch in a few steps (Fang et al., "Up to 100x Faster
Data-free Knowledge Distillation", AAAI 2022; public code ``zju-vipa/Fast-Datafree``).

A *meta* generator theta persists for the whole run. For each batch, a fast copy theta' = theta and fresh
latents z ~ N(0, I) are optimised for k steps (``--inversion-steps``: the paper's Fast-2, Fast-5 and Fast-10
use 2, 5 and 10; the latents with a higher learning rate than the generator) on

    L = beta * L_bn^mmt + alpha * L_cls + gamma * L_adv

and the batch stored is the best iterate (lowest L), as the public code keeps it. Then the meta generator
learns to be a better starting point, by the first-order meta-gradient of Reptile,

    g_meta = theta - theta'(k)            (the paper's first-order approximation of the meta-gradient)

applied by the meta optimiser (Adam, learning rate ``meta_lr``, by default generator lr x k, as the public
code sets it), so that theta moves towards where the fast copy adapted.

* L_bn^mmt (Fast's momentum feature regulariser): the batch's BN statistics are blended with a running
  estimate over earlier synthetic batches, (1 - m) * batch + m * running, before they are compared with
  the teacher's (m = ``bn_momentum``, 0.9); the running estimate takes each batch's last-step statistics.
* L_adv is the decision-adversarial KL against the proxy student, switched on after ``warmup`` batches.
* The teacher sees a random crop with 4-pixel padding and a flip of each image.

Where the paper and the public code differ: the code's default meta-gradient is first-order MAML (the inner
steps' gradients summed, ``is_maml=1``); its Reptile variant scales theta - theta' by 67 before the same Adam
step. We take Reptile, the form the paper derives its speed-up from and the one whose meta-update is exact to
check (Adam is invariant to the constant scale). The code's ``reset_l0`` (re-initialising the generator's
first layer once, at epoch 140 of 220) is a schedule trick of its 220-epoch runs, not in the paper; left out.
Defaults follow the public scripts for a WRN teacher (Fast-5: lr 3e-3, latent lr 0.01, alpha 0.4, beta 10,
gamma 1.1, m 0.9, warm-up 20); for Fast-2 the scripts use lr 5e-3 and latent lr 0.015, for Fast-10 lr 2e-3.

**The adversary is a proxy, not the real student.** In the public code L_adv is computed against the student
being distilled: after each synthesised batch it trains 400 KD steps (T = 20, SGD lr 0.2, cosine to 2e-4
over 200 epochs, held during the warm-up) on batches drawn from *every* image made so far, with a live
teacher and crop/flip augmentation. Here synthesis and distillation are separate commands, so L_adv is
computed against an in-loop proxy student (``--proxy-student``) that learns from a replay memory of the
stored images (FIFO, ``--memory-capacity``) with a live teacher on shifted/flipped replays, and ``distill
run`` trains the real student afterwards. The paper preset sets the proxy's per-batch training as the
reference's: ``kd_steps`` 400, ``kd_temperature`` 20, ``proxy_lr`` 0.2, ``proxy_schedule`` cosine over
``proxy_schedule_batches`` 200 (held for the warm-up batches). What still differs: the proxy's SGD weight
decay (5e-4; the reference 1e-4) and the replay pool, 8,192 images unless ``--memory-capacity`` is raised
(50,000 holds a whole paper-preset run: 150 MB at 32 px). The CPU preset keeps the setting its benchmark rows
were measured with (5 KD steps at T = 4, lr 0.1 constant): at 8 batches a 400-step proxy would cost more
than the synthesis itself.

**Budget.** The meta generator learns once per batch: the CPU preset's 512 images at batch 64 are 8
meta-updates (the reference runs 220 epochs, one meta-update each, and L_adv starts after 20), so the CPU
rows measure a barely trained meta generator; ``pipelines/results`` marks them budget-starved.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from synth.core import augment
from synth.core.inversion import GeneratorInversion
from synth.core.inversion_config import ReferenceStudentConfig, ResetMode
from synth.core.losses import bn_statistics_loss
from synth.core.proxy import set_lr
from synth.core.updates import ParamGroup


@dataclass
class FastConfig(ReferenceStudentConfig):
    """Fast's hyperparameters (public CIFAR scripts, WRN teacher, Fast-5)."""

    # The proxy settings are those the CPU rows were measured with (see the module docstring).
    cpu_budget: ClassVar[dict[str, Any]] = {"batch_size": 64, "inversion_steps": 5, "kd_steps": 5, "warmup": 2,
                                            "kd_temperature": 4.0, "proxy_lr": 0.1, "proxy_schedule": "constant"}

    inversion_steps: int = field(default=5, metadata={
        "help": "k: adaptation steps of the fast copy per batch (the paper's Fast-2/5/10)"})
    generator_lr: float = field(default=3e-3, metadata={
        "help": "Adam learning rate of the fast copy (scripts: 5e-3 for Fast-2, 3e-3 for Fast-5, 2e-3 for Fast-10)"})
    latent_lr: float = field(default=0.01, metadata={
        "help": "Adam learning rate of the latents (scripts: 0.015 for Fast-2, 0.01 otherwise)"})
    meta_lr: float = field(default=0.0, metadata={
        "help": "Adam learning rate of the meta generator's Reptile step (0: generator lr x inversion steps)"})
    class_weight: float = field(default=0.4, metadata={"help": "alpha: weight of the class prior L_cls"})
    bn_weight: float = field(default=10.0, metadata={"help": "beta: weight of the momentum BN loss L_bn^mmt"})
    adv_weight: float = field(default=1.1, metadata={"help": "gamma: weight of the adversarial term L_adv"})
    bn_momentum: float = field(default=0.9, metadata={
        "help": "m: weight of the running synthetic statistics in L_bn^mmt (0: plain BN matching)"})
    warmup: int = field(default=20, metadata={"help": "batches before L_adv is switched on"})
    decision_adversarial: bool = field(default=True, metadata={
        "help": "count L_adv only where teacher and proxy student agree (the public code's adversarial term)"})
    proxy_lr: float = field(default=0.2, metadata={"help": "SGD learning rate of the proxy student (at its start)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.bn_momentum < 1:
            raise ValueError(f"bn_momentum must be in [0, 1), got {self.bn_momentum}")
        if self.warmup < 0 or self.meta_lr < 0:
            raise ValueError("warmup and meta_lr must be >= 0")


class Fast(GeneratorInversion):
    name = "fast"
    summary = "Fast: a meta generator adapted in a few steps per batch, Reptile meta-update (Fang et al. 2022)"
    paper = "Fang et al., Up to 100x Faster Data-free Knowledge Distillation, AAAI 2022"
    config_class = FastConfig
    config: FastConfig
    default_reset: ResetMode = "keep"  # the meta generator persists; each batch adapts a copy of it
    keeps_best_iterate = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.fast_generator = copy.deepcopy(self.generator)
        meta_lr = cfg.meta_lr or cfg.generator_lr * cfg.inversion_steps
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), lr=meta_lr, betas=(0.5, 0.999))
        self.synthetic_stats: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def begin_batch(self, labels: torch.Tensor) -> dict[str, ParamGroup]:
        """theta' = theta, fresh latents; the inner loop optimises the copy, never the meta generator."""
        self.reset_generator()
        self.fast_generator.load_state_dict(self.generator.state_dict())
        self.latents = self.sample_latents(labels).detach().requires_grad_(True)
        return {"generator": ParamGroup(list(self.fast_generator.parameters()), self.config.generator_lr),
                "latents": ParamGroup([self.latents], self.config.latent_lr)}

    def generate(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.acceleration.tensor(self.fast_generator(latents))

    def teacher_view(self, images: torch.Tensor) -> torch.Tensor:
        if not self.config.augment_views:
            return images
        return self.acceleration.tensor(augment.random_shift_flip(images, max_shift=4))

    def bn_loss(self) -> torch.Tensor:
        if self.synthetic_stats is None or not self.config.bn_momentum:
            return bn_statistics_loss(self.bn_hook)
        return bn_statistics_loss(self.bn_hook, self.synthetic_stats, self.config.bn_momentum)

    def wants_adversarial(self) -> bool:
        return super().wants_adversarial() and self.batches_done >= self.config.warmup

    def train_proxy_student(self) -> None:
        """The reference's schedule: its scheduler steps once per epoch (one batch) only after the warm-up."""
        set_lr(self.student_optimizer, self.config.proxy_lr_after(max(0, self.batches_done - self.config.warmup)))
        super().train_proxy_student()

    def after_inversion(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The Reptile meta-update of theta towards the adapted copy, and the running synthetic statistics."""
        self.meta_optimizer.zero_grad(set_to_none=True)
        for meta, fast in zip(self.generator.parameters(), self.fast_generator.parameters(), strict=True):
            meta.grad = (meta.detach() - fast.detach()).clone()
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        if self.bn_hook is not None and self.bn_hook.batch_stats:
            m = self.config.bn_momentum
            last = [(mean.detach(), var.detach()) for mean, var in self.bn_hook.batch_stats]
            if self.synthetic_stats is None:
                self.synthetic_stats = last
            else:
                self.synthetic_stats = [(m * run_mean + (1 - m) * mean, m * run_var + (1 - m) * var)
                                        for (run_mean, run_var), (mean, var) in zip(self.synthetic_stats, last,
                                                                                   strict=True)]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["meta_optimizer"] = self.meta_optimizer.state_dict()
        state["synthetic_stats"] = ([torch.stack([mean, var]) for mean, var in self.synthetic_stats]
                                    if self.synthetic_stats is not None else None)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        saved = state["synthetic_stats"]
        self.synthetic_stats = ([(pair[0].to(self.device), pair[1].to(self.device)) for pair in saved]
                                if saved is not None else None)

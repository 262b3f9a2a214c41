"""The generator-based inversion loop every generator method plugs into (gMI, D2CIP, and those to come).

One batch, as gMI frames it (D2CIP Sec. 3.1; CMI; Fast): learnable latents and a generator are optimised
for ``inversion_steps`` steps against the frozen teacher; the finished batch is stored, joins the replay
memory, and the in-loop *proxy student* learns from that memory by KD so that the adversarial term has
something to disagree with. A method changes the loop only through these named points:

==========================  ===============================================================================
``build_generator()``       the generator module
``generate(latents, y)``    images from latents *and labels* (a conditional generator uses ``y``)
``sample_latents(y)``       the latent prior (N(0, I) here; D2CIP's class-conditional GMM)
``begin_batch(y)``          per-batch set-up; returns the parameter groups (:class:`ParamGroup`) by name
``teacher_view_count()``    augmented views the teacher sees per step (D2CIP's L_scr needs two)
``make_views(x)``           the views themselves (CMI: one global and one local crop)
``losses(step)``            the named loss terms, each a :class:`Term` naming the groups it updates
``after_step(step, terms)`` after each step's update (CMI keeps the best iterate)
``batch_result(y)``         the batch's images (the last iterate; CMI: the best)
``after_inversion(x, y)``   after every inverted batch (D2CIP's memory banks)
``end_batch(batch)``        after every *stored* batch (replay memory, proxy-student KD)
``remember(batch)``         a stored batch (a plug-in's too) joins the replay memory with its asked labels
``proxy_student_loss(x)``   the proxy student's objective on replayed images (KD; CPSC: L_IKD + L_CE + L_SCL)
``next_batch()``            one stored batch (D2CIP's A.8 selects one of several inverted candidates)
==========================  ===============================================================================

Loss plug-ins (:mod:`synth.plugins`) add terms and their own updates to any such method without touching its
file. The updates are exact and fused: :class:`~synth.core.updates.UpdateEngine` gives each group the gradient of
exactly the terms that name it, in the fewest backward passes. All views of a step go through the teacher
in one forward pass, BN statistics read from the first view only (the teacher is in eval mode, so the other
rows do not change them).

The options every generator method shares (:class:`~synth.core.inversion_config.InversionConfig`) live in
``inversion_config.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

import zoo

from . import augment
from .generators import DCGANGenerator, reinitialise
from .hooks import recording
from .inversion_config import InversionConfig, ResetMode
from .losses import adversarial_kl_loss, bn_statistics_loss, class_prior_loss, distillation_loss
from .memory import MemoryBank
from .pixels import dequantise, quantise
from .protocol import InversionStep, LossPlugin, SynthBatch, SynthesisMethod
from .updates import KeptOptimizers, ParamGroup, Term, UpdateDeclarationError, UpdateEngine, make_optimizers, term


class GeneratorInversion(SynthesisMethod):
    """The loop; a method subclasses it and overrides the points listed in the module docstring."""

    accepts_plugins = True
    config: InversionConfig
    #: What ``reset_generator="auto"`` means for this method.
    default_reset: ResetMode = "keep"
    #: All views through the teacher in one forward pass (faster when one backward pass serves every
    #: parameter group); a method whose update needs a second pass through the first view only sets False.
    fuse_teacher_views: bool = True
    #: Record every sample's per-channel means at each BN layer's input, per view (CMI's features).
    records_instance_means: bool = False
    #: Yield the iterate with the lowest total loss rather than the last (CMI and Fast do).
    keeps_best_iterate: bool = False
    #: Also give each step the proxy student's penultimate features (CPSC-DFKD's contrast needs them).
    wants_student_features: bool = False
    #: Groups whose Adam persists across batches while the generator is kept (CPSC, K-Gen); the others get a
    #: fresh Adam per batch, as CMI re-creates its optimiser per round (gMI, D2CIP, CMI: on purpose).
    persistent_groups: tuple[str, ...] = ()
    #: Call :meth:`proxy_student_loss` as ``(images, labels)``: the replayed images' asked labels (CPSC).
    replays_labels: bool = False

    def __init__(self, teacher: zoo.Classifier, config: InversionConfig, device: torch.device,
                 plugins: Sequence[LossPlugin] = (), acceleration: zoo.Acceleration | None = None):
        super().__init__(teacher, config, device, plugins, acceleration)
        self.generator = self.acceleration.module(self.build_generator())
        self.initial_generator_state = _clone_state(self.generator)
        self.student = self.acceleration.module(self.build_proxy_student())
        self.student_optimizer = torch.optim.SGD(self.student.parameters(), lr=config.proxy_lr, momentum=0.9,
                                                 weight_decay=5e-4)
        self.memory = MemoryBank(config.memory_capacity)  # quantised (uint8) images, as the shards store them
        self.engine = UpdateEngine()
        self.latents = torch.empty(0)
        self._best: tuple[float, torch.Tensor] | None = None  # (total loss, images) when keeping the best
        self._last_terms: dict[str, torch.Tensor] = {}
        self.kept_optimizers = KeptOptimizers()
        for plugin in self.plugins:
            plugin.attach(self)

    # -- extension points -------------------------------------------------------------------------------

    def build_generator(self) -> nn.Module:
        if self.height != self.width:
            raise ValueError(f"the DCGAN generator makes square images; the teacher expects {self.height}x{self.width}")
        return DCGANGenerator(self.config.latent_dim, self.channels, self.height, self.config.generator_width)

    def generate(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] for ``latents``; ``labels`` are there for conditional generators."""
        return self.acceleration.tensor(self.generator(latents))

    def build_proxy_student(self) -> nn.Module:
        network = zoo.build_model(self.config.proxy_student, self.num_classes, self.channels)
        return zoo.Classifier(network, self.teacher.mean.flatten().tolist(), self.teacher.std.flatten().tolist())

    def sample_latents(self, labels: torch.Tensor) -> torch.Tensor:
        """The latent prior: z ~ N(0, I), independent of the label."""
        return torch.randn(labels.shape[0], self.config.latent_dim, device=self.device)

    def reset_mode(self) -> ResetMode:
        mode = self.config.reset_generator
        return self.default_reset if mode == "auto" else mode

    def reset_generator(self) -> None:
        """Start-of-batch generator: kept, restored to the run's initial weights, or freshly initialised."""
        mode = self.reset_mode()
        if mode == "initial":
            self.generator.load_state_dict(self.initial_generator_state)
        elif mode == "random":
            reinitialise(self.generator)

    def begin_batch(self, labels: torch.Tensor) -> dict[str, ParamGroup]:
        """Prepares a batch and returns the parameter groups to optimise, by name."""
        self.reset_generator()
        self.latents = self.sample_latents(labels).detach().requires_grad_(True)
        return {"generator": ParamGroup(list(self.generator.parameters()), self.config.generator_lr),
                "latents": ParamGroup([self.latents], self.config.latent_lr)}

    def keep_optimizers(self, groups: dict[str, ParamGroup], suffix: str = "") -> None:
        """Run-long Adams (keyed ``name + suffix``) for :attr:`persistent_groups`, unless weights reset per batch."""
        if self.reset_mode() == "keep":
            for name in [g for g in self.persistent_groups if g in groups and groups[g].optimizer is None]:
                self.kept_optimizers.attach(name + suffix, groups[name])

    def teacher_view_count(self) -> int:
        return 1

    def teacher_view(self, images: torch.Tensor) -> torch.Tensor:
        if not self.config.augment_views:
            return images
        return self.acceleration.tensor(augment.random_resized_crop_flip(images, scale=(0.5, 1.0)))

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """What the teacher sees this step: ``teacher_view_count()`` augmented views; BN matching, the class
        prior and the proxy student use the first."""
        return [self.teacher_view(images) for _ in range(self.teacher_view_count())]

    def after_step(self, step: InversionStep, terms: dict[str, Term]) -> None:
        """After each step's update: remembers the step's images when they are the best so far (the images
        the step's losses were computed on, i.e. before its update) if :attr:`keeps_best_iterate`."""
        if not self.keeps_best_iterate:
            return
        total = float(sum(t.value.detach() for t in terms.values()))
        if self._best is None or total < self._best[0]:
            self._best = (total, step.images.detach().float())
            self.on_new_best(step)

    def on_new_best(self, step: InversionStep) -> None:
        """Called when :meth:`after_step` keeps a new best iterate (CMI keeps its features too)."""

    def batch_result(self, labels: torch.Tensor) -> torch.Tensor:
        """The images this batch yields: the best iterate's, or the generator's output after the last step."""
        if self.keeps_best_iterate and self._best is not None:
            return self._best[1]
        with torch.no_grad(), self.acceleration.autocast():
            return self.generate(self.latents, labels).detach().float()

    def losses(self, step: InversionStep) -> dict[str, Term]:
        """The terms of one step. gMI: :meth:`gmi_terms` (Eq. 4)."""
        return self.gmi_terms(step)

    #: Overall weight of L_gMI among a method's terms (D2CIP's lambda2); 1 in plain gMI.
    gmi_scale: float = 1.0
    #: The groups L_gMI updates.
    gmi_groups: tuple[str, ...] = ("generator", "latents")

    def gmi_terms(self, step: InversionStep) -> dict[str, Term]:
        """The weighted terms of L_gMI = alpha L_cls + beta L_bn + gamma L_adv (D2CIP Eq. 1-4). A term with
        weight 0 is absent; L_adv is absent until the proxy student has learnt from a stored batch."""
        cfg, scale, groups = self.config, self.gmi_scale, self.gmi_groups
        terms: dict[str, Term] = {}
        if cfg.class_weight:
            terms["cls"] = term(scale * cfg.class_weight * class_prior_loss(step.teacher_logits, step.labels), *groups)
        if cfg.bn_weight and self.bn_hook is not None:  # no hook: uses_bn_statistics() said no (K-Gen's ViT)
            terms["bn"] = term(scale * cfg.bn_weight * self.bn_loss(), *groups)
        if cfg.adv_weight and step.student_logits is not None:
            adv = adversarial_kl_loss(step.teacher_logits, step.student_logits,
                                      decision_adversarial=cfg.decision_adversarial)
            terms["adv"] = term(scale * cfg.adv_weight * adv, *groups)
        return terms

    def bn_loss(self) -> torch.Tensor:
        """L_bn of the step just run (D2CIP Eq. 2); Fast blends in its running synthetic statistics."""
        return bn_statistics_loss(self.bn_hook)

    def wants_adversarial(self) -> bool:
        """Whether this batch's steps include L_adv: once the proxy student has learnt something."""
        return self.config.adv_weight > 0 and self.proxy_has_learnt

    def after_inversion(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Called after every inverted batch, stored or not. Nothing to do in gMI."""

    def end_batch(self, batch: SynthBatch) -> None:
        """Called after every stored batch: it joins the replay memory and the proxy student learns."""
        self.remember(batch)
        self.train_proxy_student()

    def remember(self, batch: SynthBatch) -> None:
        """A stored batch (a plug-in's too: the condensed images) joins the replay memory with its labels."""
        self.memory.push(quantise(batch.images), batch.labels)

    def next_batch(self) -> SynthBatch:
        """One stored batch: the next labels, inverted."""
        labels = self.next_labels()
        images = self.invert_batch(labels)
        self.after_inversion(images, labels)
        return SynthBatch(images, labels)

    # -- the proxy student ------------------------------------------------------------------------------

    @property
    def proxy_has_learnt(self) -> bool:
        return self.config.kd_steps > 0 and len(self.memory) > 0

    def train_proxy_student(self) -> None:
        """KD of the proxy student on batches replayed from the memory bank (CMI's KD phase)."""
        if not self.proxy_has_learnt:
            return
        with record_function("synth.proxy_kd"):
            self._proxy_kd_steps()

    def proxy_student_loss(self, images: torch.Tensor) -> torch.Tensor:
        """What the proxy student minimises on a replayed batch: KD from the teacher at ``kd_temperature``."""
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        return distillation_loss(self.student(images).float(), teacher_logits, self.config.kd_temperature)

    def _proxy_kd_steps(self) -> None:
        self.student.train()
        for _ in range(self.config.kd_steps):
            pixels, labels = self.memory.sample_with_labels(self.config.batch_size)
            images = self.acceleration.tensor(augment.random_shift_flip(dequantise(pixels)))
            asked = (labels,) if self.replays_labels else ()
            with self.acceleration.autocast():
                loss = self.proxy_student_loss(images, *asked)
            self.student_optimizer.zero_grad(set_to_none=True)
            self.grad_scaler.scale(loss).backward()  # unscaled, a no-op, unless fp16
            self.grad_scaler.step(self.student_optimizer)
            self.grad_scaler.update()
        self.student.eval()

    # -- the loop ----------------------------------------------------------------------------------------

    def invert_batch(self, labels: torch.Tensor) -> torch.Tensor:
        """Optimises one batch; returns the final images (detached, pixel space)."""
        groups = self.begin_batch(labels)
        for plugin in self.plugins:
            self._merge_from_plugin(groups, plugin.begin_batch(labels), plugin.name, "a parameter group")
        self.keep_optimizers(groups)
        optimizers = make_optimizers(groups)
        self.engine.reset()
        self._best = None
        needs_student = self.wants_adversarial()
        self.student.eval()
        for index in range(self.config.inversion_steps):
            with self.acceleration.autocast():
                with record_function("synth.generate"):
                    images = self.generate(self.latents, labels)
                step = self.forward_step(index, labels, images, needs_student)
            with record_function("synth.losses"):
                terms = self.step_terms(step)
            with record_function("synth.update"):
                self.engine.apply(terms, groups, optimizers, self.grad_scaler)
            self.after_step(step, terms)
            for plugin in self.plugins:
                with record_function(f"synth.plugin.{plugin.name}"):
                    plugin.after_step(step)
            self._last_terms = {name: t.value.detach() for name, t in terms.items()}
        return self.batch_result(labels)

    def forward_step(self, index: int, labels: torch.Tensor, images: torch.Tensor,
                     needs_student: bool) -> InversionStep:
        """The teacher on every view (one forward pass, or one per view: :attr:`fuse_teacher_views`), BN
        statistics from the first view only; the proxy student on the first view."""
        n = images.shape[0]
        views = self.make_views(images)
        means = self.records_instance_means
        instance: list[torch.Tensor] | None = None
        with record_function("synth.teacher"):
            if self.fuse_teacher_views or len(views) == 1:
                batch = views[0] if len(views) == 1 else self.acceleration.tensor(torch.cat(views))
                with recording(self.bn_hook, first=n, instance_means=means):
                    logits, features = self.teacher.forward_with_features(batch)
                per_view = list(features.float().split(n))
                if means:
                    instance = list(self.bn_hook.instance_features().split(n))
            else:
                with recording(self.bn_hook, instance_means=means):
                    logits, first = self.teacher.forward_with_features(views[0])
                per_view, instance = [first.float()], [self.bn_hook.instance_features()] if means else None
                for view in views[1:]:
                    with recording(self.bn_hook, instance_means=means, batch_stats=False):
                        per_view.append(self.teacher.features(view).float())
                    if instance is not None:
                        instance.append(self.bn_hook.instance_features())
        student_logits = student_features = None
        if needs_student:
            with record_function("synth.proxy_student"):
                if self.wants_student_features:
                    student_logits, student_features = self.student.forward_with_features(views[0])
                    student_features = student_features.float()
                else:
                    student_logits = self.student(views[0])
                student_logits = student_logits.float()
        return InversionStep(index, labels, self.latents, images, views, logits[:n].float(), per_view,
                             student_logits, instance, student_features)

    def step_terms(self, step: InversionStep) -> dict[str, Term]:
        """The method's terms and every plug-in's, which may not reuse a name."""
        terms = self.losses(step)
        for plugin in self.plugins:
            self._merge_from_plugin(terms, plugin.losses(step), plugin.name, "a term")
        return terms

    def _merge_from_plugin(self, own: dict, added: dict, plugin: str, kind: str) -> None:
        """Adds a plug-in's groups or terms; a name the method (or an earlier plug-in) uses is an error."""
        for name, value in added.items():
            if name in own:
                raise UpdateDeclarationError(f"loss plug-in {plugin!r} adds {kind} {name!r} that {self.name} "
                                             "already has; name it after the plug-in")
            own[name] = value

    def synthesize(self) -> Iterator[SynthBatch]:
        for plugin in self.plugins:  # e.g. the condensed samples: first, once per dataset, replayed too
            for batch in plugin.initial_batches():
                self.remember(batch)
                yield batch
        while True:
            batch = self.next_batch()
            self.end_batch(batch)
            extra = [b for plugin in self.plugins for b in plugin.end_batch(batch)]
            self.batches_done += 1
            yield batch
            yield from extra

    # -- resumability ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "generator": self.generator.state_dict(),
            "student": self.student.state_dict(),
            "student_optimizer": self.student_optimizer.state_dict(),
            "memory": self.memory.state_dict(),
            "plugins": {plugin.name: plugin.state_dict() for plugin in self.plugins},
        })
        state["kept_optimizers"] = self.kept_optimizers.state_dict()  # {} unless persistent_groups
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.student.load_state_dict(state["student"])
        self.student_optimizer.load_state_dict(state["student_optimizer"])
        self.memory.load_state_dict(state["memory"], device=self.device)
        self.kept_optimizers.load_state_dict(state.get("kept_optimizers", {}))
        saved = state.get("plugins", {})
        for plugin in self.plugins:
            if plugin.name not in saved:
                raise ValueError(f"the resume state has no state for loss plug-in {plugin.name!r}")
            plugin.load_state_dict(saved[plugin.name])

    def losses_of_last_step(self) -> dict[str, float]:
        return {name: float(value) for name, value in self._last_terms.items()}


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}

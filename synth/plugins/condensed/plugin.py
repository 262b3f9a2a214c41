"""Condensed-data-guided model inversion (Condensed Data Expansion Using Model Inversion, AAAI 2026,
arXiv 2408.13850) as a loss plug-in: ``synth run METHOD --condensed PATH`` for every generator method.

What the paper specifies, and where it lives here:

* **L_G = L_MI + L_FA** ("Feature Alignment Mechanism"): the host's own objective L_MI is untouched; this
  plug-in adds the term ``fa`` = ``fa_weight`` * L_FA to the groups the host's L_MI updates
  (``host.gmi_groups``: generator and latents). ``fa_weight`` 1 is the paper's unweighted sum.
* **The discriminator works on the teacher's penultimate features** and is **conditional**: it judges real
  (condensed) against synthetic *and* the class. We use a projection discriminator (Miyato & Koyama 2018):
  D(f, y) = w . phi(f) + b + e_y . phi(f), phi a two-layer MLP with spectral norm. The paper does not name its
  form; projection makes the real/fake decision *per class* (a synthetic feature of class y is compared with
  the condensed features of class y), which is exactly the intra-class alignment the paper motivates, whereas
  an auxiliary class head would only repeat the teacher's class prior L_cls that every host already has.
  ``--unconditional-discriminator`` drops e_y (the paper's ablation: global alignment only).
* **Differentiable augmentation on both sides** ("to prevent discriminator overfitting"): DiffAugment
  (colour, translation, cutout; :func:`synth.core.augment.diff_augment`) on the generator's images and on the
  condensed images before the teacher. The synthetic side gets its own augmented teacher pass rather than the
  host's view, so both sides see the same augmentation whatever the host does (one more teacher forward and
  backward per step: the price of the plug-in).
* **Losses** (silent in the paper; the standard non-saturating GAN loss, with which DiffAugment was shown):
  L_D = E_real softplus(-D(f_c, y_c)) + E_syn softplus(D(f_s, y_s)) and L_FA = E_syn softplus(-D(f_s, y_s)).
  The discriminator takes one Adam step (betas 0.5/0.999) after each host step, on detached features; its
  real batch draws, for every synthetic sample, a condensed image of the same class, so both sides hold the
  same classes. Its learning rate, 4e-3, is four times the hosts' generator rate (the two-time-scale rule of
  Heusel et al. 2017): a batch lasts only a few host steps, and on the toy case of tests/test_condensed.py a
  discriminator at the GAN default 2e-4 lags so far behind that L_FA follows a near-random critic and the
  features drift away from the condensed ones instead of toward them.
* **One resolution on both sides**: a host that generates below the teacher's input (K-Gen's 28 px on a
  32 px teacher) has its condensed batch resized (area) to the synthetic batch's size before the teacher, so
  the discriminator cannot tell the two apart by resolution alone.
* **The host's proxy student replays the condensed images** (they join its memory with their labels before
  the first synthetic batch), as the paper's student learns from both.
* **The dataset identity holds the set's content hash** (``condensed_sha256``), not only its path: a resume
  refuses a changed set.
* **The student learns from both** (the paper's student objective, two KL expectations): the condensed images
  are stored in the dataset, first and once, marked ``source: condensed`` with their teacher logits;
  ``distill run`` weights the two expectations (``--synthetic-weight``, ``--condensed-weight``).
  ``--fa-weight 0`` stores them without guidance: the paper's "naive mixing" baseline.

The paper trains the student inside the synthesis loop ("integrated training-distillation"); this toolkit
separates synthesis from distillation by design, so the host's proxy student plays that role during
synthesis and ``distill`` trains the shipped student afterwards on the mixed set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synth.core.augment import diff_augment
from synth.core.protocol import LossPlugin, SynthBatch
from synth.core.updates import Term, term

from .data import MAX_PER_CLASS, CondensedSet, load_condensed

if TYPE_CHECKING:
    import zoo
    from synth.core.inversion import GeneratorInversion, InversionStep


@dataclass
class CondensedOptions:
    """Options of the condensed-data plug-in (each becomes ``--kebab-case`` on ``synth run METHOD``)."""

    condensed: str | None = field(default=None, metadata={
        "help": "condensed images that guide the inversion (1-50 per class): a folder per class, an .npz with "
                "images and labels, or a dataset directory; they also join the dataset (source: condensed)"})
    condensed_resize: bool = field(default=False, metadata={
        "help": "resize condensed images to the teacher's input size and convert their channels"})
    condensed_max_per_class: int = field(default=MAX_PER_CLASS, metadata={
        "help": "refuse condensed sets with more images in a class than this (the paper's range is 1-50)"})
    fa_weight: float = field(default=1.0, metadata={
        "help": "weight of the feature-alignment loss L_FA in L_G = L_MI + L_FA (0: naive mixing, the condensed "
                "images join the dataset without guiding the inversion)"})
    unconditional_discriminator: bool = field(default=False, metadata={
        "help": "real/fake only, without the class (the paper's ablation)"})
    discriminator_width: int = field(default=256, metadata={"help": "hidden width of the feature discriminator"})
    discriminator_lr: float = field(default=4e-3, metadata={
        "help": "Adam learning rate of the discriminator (4x the hosts' generator rate, TTUR)"})
    condensed_augment: bool = field(default=True, metadata={
        "help": "DiffAugment (colour, translation, cutout) on both sides of the discriminator"})

    def __post_init__(self) -> None:
        if self.condensed_max_per_class < 1:
            raise ValueError(f"condensed_max_per_class must be >= 1, got {self.condensed_max_per_class}")
        if self.fa_weight < 0 or self.discriminator_width < 1 or self.discriminator_lr <= 0:
            raise ValueError("fa_weight must be >= 0, discriminator_width and discriminator_lr positive")


class FeatureDiscriminator(nn.Module):
    """D(f, y) = w . phi(f) + b [+ e_y . phi(f)]: a projection discriminator on penultimate features."""

    def __init__(self, feature_dim: int, num_classes: int, width: int, conditional: bool):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.body = nn.Sequential(sn(nn.Linear(feature_dim, width)), nn.LeakyReLU(0.2),
                                  sn(nn.Linear(width, width)), nn.LeakyReLU(0.2))
        self.head = sn(nn.Linear(width, 1))
        self.embed = nn.Embedding(num_classes, width) if conditional else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=width ** -0.5)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.body(features)
        score = self.head(hidden).squeeze(1)
        if self.embed is not None:
            score = score + (self.embed(labels) * hidden).sum(1)
        return score


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """L_D: non-saturating GAN loss, real (condensed) scores up, synthetic scores down."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def feature_alignment_loss(fake: torch.Tensor) -> torch.Tensor:
    """L_FA (the paper's L_G = L_MI + L_FA): the generator's side, synthetic features scored as real."""
    return F.softplus(-fake).mean()


class CondensedGuidance(LossPlugin):
    name = "condensed"
    summary = "condensed images guide the inversion through a conditional feature discriminator (L_FA)"
    options_class = CondensedOptions
    options: CondensedOptions

    def __init__(self, options: CondensedOptions):
        super().__init__(options)
        self.data: CondensedSet | None = None
        self.emitted = False
        self.discriminator: FeatureDiscriminator | None = None
        self.last_discriminator_loss: torch.Tensor | None = None
        self._fake: tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None = None

    @classmethod
    def enabled(cls, options: CondensedOptions) -> bool:
        return bool(options.condensed)

    def check(self, teacher: zoo.Classifier) -> None:
        opts = self.options
        self.data = load_condensed(opts.condensed or "", num_classes=teacher.num_classes,
                                   shape=teacher.input_shape, class_names=teacher.card.class_names,
                                   resize=opts.condensed_resize, max_per_class=opts.condensed_max_per_class)

    def extra_samples(self) -> int:
        return len(self.data) if self.data is not None else 0

    def identity_extras(self) -> dict[str, Any]:
        """The set's content hash: the path alone would let a resume accept changed files."""
        return {"condensed_sha256": self.data.sha256} if self.data is not None else {}

    def attach(self, host: GeneratorInversion) -> None:
        super().attach(host)
        if self.data is None:
            self.check(host.teacher)
        assert self.data is not None
        device = host.device
        self.images = torch.from_numpy(self.data.images).permute(0, 3, 1, 2).float().div(255).to(device)
        self.labels = torch.from_numpy(self.data.labels).to(device)
        # Condensed indices sorted by class, with each class's offset and count, for same-class sampling.
        order = np.argsort(self.data.labels, kind="stable")
        counts = np.bincount(self.data.labels, minlength=host.num_classes)
        self.order = torch.from_numpy(order).to(device)
        self.class_count = torch.from_numpy(counts).to(device)
        self.class_start = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]])).to(device)
        if self.options.fa_weight > 0:
            dim = host.teacher.feature_dim or int(host.teacher.features(
                torch.zeros(2, *host.teacher.input_shape, device=device)).shape[1])
            self.discriminator = FeatureDiscriminator(dim, host.num_classes, self.options.discriminator_width,
                                                      not self.options.unconditional_discriminator).to(device)
            self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.options.discriminator_lr,
                                              betas=(0.5, 0.999))

    def initial_batches(self) -> list[SynthBatch]:
        if self.emitted:
            return []
        self.emitted = True
        return [SynthBatch(self.images, self.labels, source="condensed")]

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        host = self.host
        assert host is not None
        if self.options.condensed_augment:
            images = diff_augment(images)
        with host.acceleration.autocast():
            return host.teacher.features(host.acceleration.tensor(images)).float()

    def real_batch(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each label, a uniformly drawn condensed image of that class."""
        pick = (torch.rand(labels.shape[0], device=labels.device) * self.class_count[labels]).long()
        index = self.order[self.class_start[labels] + pick]
        return self.images[index], self.labels[index]

    def losses(self, step: InversionStep) -> dict[str, Term]:
        if self.discriminator is None:  # naive mixing: stored, no guidance
            return {}
        assert self.host is not None
        features = self._features(step.images)
        self._fake = (features.detach(), step.labels, (step.images.shape[-2], step.images.shape[-1]))
        loss = feature_alignment_loss(self.discriminator(features, step.labels))
        return {"fa": term(self.options.fa_weight * loss, *self.host.gmi_groups)}

    def after_step(self, step: InversionStep) -> None:
        if self.discriminator is None or self._fake is None:
            return
        fake_features, fake_labels, size = self._fake
        images, labels = self.real_batch(fake_labels)
        if tuple(images.shape[-2:]) != size:  # a lower-resolution host: both sides at the synthetic size
            images = F.interpolate(images, size=size, mode="area")
        with torch.no_grad():
            real_features = self._features(images)
        loss = discriminator_loss(self.discriminator(real_features, labels),
                                  self.discriminator(fake_features, fake_labels))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.last_discriminator_loss = loss.detach()
        self._fake = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"emitted": self.emitted}
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.emitted = bool(state["emitted"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.optimizer.load_state_dict(state["optimizer"])

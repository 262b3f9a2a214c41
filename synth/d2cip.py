"""D2CIP: Dual Contrastive Inversion with Distributional Priors (papers/d2cip.txt).

Stage 1 - distributional prior recovery (Alg. 1, Eq. 5-7). A class-conditional Gaussian mixture over the
generator's latent (:class:`synth.priors.ClassConditionalGMM`) is trained jointly with a generator on

    L_s1 = alpha * L_cls + beta * L_bn                                                         (Eq. 6)

sampling z by the reparameterisation of Eq. 7. The prior (and the generator it was trained with) is saved
as ``prior.pt`` inside the dataset and recorded in the manifest; ``--prior PATH`` reuses one and skips
stage 1.

Stage 2 - dual contrastive inversion (Alg. 2, Eq. 8-14). For every batch the generator is re-initialised,
latents are drawn from the fixed prior and optimised together with it, using

    L_zcr = InfoNCE(h_z(z), h_z(z + sigma * n); negatives B_z)                          (Eq. 10 on latents)
    L_scr = InfoNCE(h_x(f_T(v1(x'))), h_x(f_T(v2(x'))); negatives B_x)                   (Eq. 10 on images)
    L_gMI = alpha L_cls + beta L_bn + gamma L_adv          (Eq. 4, L_adv decision-adversarial as Eq. 15)
    latents and h_z minimise  L_s2-z = lambda2 L_gMI + lambda3 L_zcr                                (Eq. 13)
    generator and h_x minimise L_s2-G = lambda1 L_scr + lambda2 L_gMI                               (Eq. 14)

and the finished batch joins the memory banks B_z (latents) and B_x (images, kept as the teacher's
features of them - the teacher is frozen, so this equals re-encoding the stored images, at a fraction of
the cost). Hyperparameters default to Table 12.

Readings where the paper is silent or ambiguous (each chosen because it is the one that can work):

* "Initialize theta_G" per batch (Alg. 2 line 5) re-initialises the generator **to the stage-1 generator**:
  the prior is a distribution over that generator's latent space and means nothing to a random one.
* Without the cGMM (``--no-cgmm``) stage 1 still trains the generator, with a fixed N(0, I) latent, so
  that the ablation removes the mixture prior and nothing else.
* The latent views: anchor h_z(z), positive h_z(z + sigma * n) with sigma = ``latent_noise``; the image
  views: two random crops/flips of the same image.
* Selecting "the most informative batch" per cycle (A.8): with ``--select-from N`` every N consecutive
  batches are all stored, and the one with the largest decision-adversarial disagreement (Eq. 15) is the
  one replayed to the proxy student.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import zoo

from .base import Artifacts, SynthBatch, register
from .generators import ProjectionHead
from .gmi import GMI, GMIConfig, InversionStep
from .hooks import recording
from .losses import adversarial_kl_loss, bn_statistics_loss, class_prior_loss, info_nce_loss
from .memory import MemoryBank
from .priors import ClassConditionalGMM, StandardNormalPrior

PRIOR_FILE = "prior.pt"


@dataclass
class D2CIPConfig(GMIConfig):
    """D2CIP hyperparameters (Table 12); gMI's options keep their meaning."""

    num_components: int = field(default=5, metadata={"help": "K: Gaussian components per class"})
    learnable_weights: bool = field(default=True, metadata={
        "help": "learn the mixture weights pi_k (Gumbel-softmax); --no-learnable-weights fixes them at 1/K"})
    prior_iterations: int = field(default=10_000, metadata={"help": "stage-1 iterations (Table 12: 10,000)"})
    prior_lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of the GMM parameters in stage 1"})
    prior: str = field(default="", metadata={"help": "reuse this prior.pt and skip stage 1"})
    scr_weight: float = field(default=0.8, metadata={"help": "lambda1: weight of the image contrastive loss L_scr"})
    gmi_weight: float = field(default=1.0, metadata={"help": "lambda2: weight of L_gMI"})
    zcr_weight: float = field(default=1.0, metadata={"help": "lambda3: weight of the latent contrastive loss L_zcr"})
    contrast_temperature: float = field(default=0.1, metadata={"help": "tau: InfoNCE temperature"})
    latent_noise: float = field(default=0.1, metadata={
        "help": "sigma of the Gaussian perturbation of latent positives"})
    bank_size: int = field(default=4096, metadata={"help": "capacity of each memory bank (B_z, B_x)"})
    cgmm: bool = field(default=True, metadata={"help": "class-conditional GMM prior; --no-cgmm: plain N(0, I)"})
    scr: bool = field(default=True, metadata={"help": "image-level contrastive loss L_scr; --no-scr drops it"})
    zcr: bool = field(default=True, metadata={"help": "latent-level contrastive loss L_zcr; --no-zcr drops it"})
    select_from: int = field(default=1, metadata={
        "help": "replay to the proxy student only the most informative of every N batches (A.8; 1 = all)"})
    # Table 12 / CMI defaults that differ from plain gMI.
    decision_adversarial: bool = field(default=True, metadata={
        "help": "restrict L_adv to samples where teacher and proxy student agree (Eq. 15)"})
    reset_generator: bool = field(default=True, metadata={
        "help": "re-initialise the generator (to the stage-1 weights) for every batch (Alg. 2 line 5)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_components < 1 or self.select_from < 1 or self.bank_size < 1:
            raise ValueError("num_components, select_from and bank_size must be at least 1")
        if self.prior_iterations < 0:
            raise ValueError("prior_iterations must be >= 0")


@register
class D2CIP(GMI):
    name = "d2cip"
    summary = "D2CIP: class-conditional GMM prior + dual (latent and image) contrastive inversion"
    config_class = D2CIPConfig
    config: D2CIPConfig

    def __init__(self, teacher: zoo.Classifier, config: D2CIPConfig, device: torch.device):
        super().__init__(teacher, config, device)
        if config.cgmm:
            self.prior = ClassConditionalGMM(self.num_classes, config.num_components, config.latent_dim,
                                             config.learnable_weights)
        else:
            self.prior = StandardNormalPrior(config.latent_dim)
        self.prior.to(device)
        feature_dim = self._teacher_feature_dim()
        self.latent_head = ProjectionHead(config.latent_dim).to(device)
        self.image_head = ProjectionHead(feature_dim).to(device)
        self.latent_bank = MemoryBank(config.bank_size)
        self.image_bank = MemoryBank(config.bank_size)
        self._candidates: list[tuple[float, torch.Tensor]] = []

    @property
    def gmi_scale(self) -> float:
        return self.config.gmi_weight

    def _teacher_feature_dim(self) -> int:
        with torch.no_grad():
            probe = torch.zeros(2, *self.teacher.input_shape, device=self.device)
            return int(self.teacher.features(probe).shape[1])

    # -- stage 1 -----------------------------------------------------------------------------------------

    def prepare(self, artifacts: Artifacts) -> None:
        """Stage 1 (Alg. 1), unless ``--prior`` is given or this dataset already holds its prior (a resume).

        A reused prior is copied into the dataset too, so every dataset carries the prior that made it.
        """
        stored = artifacts.path(PRIOR_FILE)
        if stored is not None:
            self.load_prior(stored)
        elif self.config.prior:
            self.load_prior(Path(self.config.prior))
            artifacts.save(PRIOR_FILE, self.save_prior)
        else:
            self.recover_prior()
            artifacts.save(PRIOR_FILE, self.save_prior)
        self.initial_generator_state = {k: v.clone() for k, v in self.generator.state_dict().items()}

    def recover_prior(self) -> None:
        """Alg. 1: jointly train generator and prior on L_s1 = alpha L_cls + beta L_bn (Eq. 6)."""
        cfg = self.config
        params = [{"params": self.generator.parameters(), "lr": cfg.generator_lr}]
        prior_params = list(self.prior.parameters())
        if prior_params:
            params.append({"params": prior_params, "lr": cfg.prior_lr})
        optimizer = torch.optim.Adam(params, betas=(0.5, 0.999))
        self.generator.train()
        bar = tqdm(range(cfg.prior_iterations), desc="d2cip stage 1: prior", unit="it", leave=False,
                   dynamic_ncols=True,
                   disable=True if cfg.prior_iterations < 20 else None)  # None: off when not a terminal
        for iteration in bar:
            labels = torch.randint(self.num_classes, (cfg.batch_size,), device=self.device)
            z = self.prior.sample(labels, relaxed=True)
            images = self.generator(z)
            views = self.teacher_view(images)
            losses = self.stage1_losses(labels, views)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            if iteration % 10 == 0:
                bar.set_postfix({k: f"{float(v.detach()):.3g}" for k, v in losses.items()})

    def stage1_losses(self, labels: torch.Tensor, views: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        with recording(self.bn_hook):
            logits = self.teacher(views)
        losses = {"cls": cfg.class_weight * class_prior_loss(logits, labels)}
        if self.bn_hook is not None:
            losses["bn"] = cfg.bn_weight * bn_statistics_loss(self.bn_hook)
        return losses

    def save_prior(self, path: Path) -> None:
        torch.save({"prior": self.prior.state_dict(), "prior_config": self.prior.config(),
                    "generator": self.generator.state_dict(), "latent_dim": self.config.latent_dim,
                    "generator_width": self.config.generator_width, "cgmm": self.config.cgmm,
                    "num_classes": self.num_classes, "image_shape": list(self.teacher.input_shape)}, path)

    def load_prior(self, path: Path) -> None:
        try:
            saved = torch.load(path, map_location=self.device, weights_only=True)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"prior file not found: {path}") from error
        except Exception as error:  # a corrupt or foreign file
            raise ValueError(f"{path} is not a D2CIP prior file: {error}") from error
        expected = {"num_classes": self.num_classes, "latent_dim": self.config.latent_dim,
                    "generator_width": self.config.generator_width, "cgmm": self.config.cgmm,
                    "image_shape": list(self.teacher.input_shape)}
        for key, value in expected.items():
            if saved.get(key) != value:
                raise ValueError(f"prior {path} was made with {key}={saved.get(key)!r}; this run needs {value!r}")
        if self.config.cgmm and saved["prior_config"]["num_components"] != self.config.num_components:
            raise ValueError(f"prior {path} has K={saved['prior_config']['num_components']} components; "
                             f"pass --num-components {saved['prior_config']['num_components']}")
        self.prior.load_state_dict(saved["prior"])
        self.generator.load_state_dict(saved["generator"])

    # -- stage 2 -----------------------------------------------------------------------------------------

    def sample_latents(self, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.prior.sample(labels, relaxed=False)

    def begin_batch(self, labels: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        groups = super().begin_batch(labels)
        groups["latents"] = groups["latents"] + list(self.latent_head.parameters())
        groups["generator"] = groups["generator"] + list(self.image_head.parameters())
        return groups

    def forward_step(self, labels: torch.Tensor, images: torch.Tensor, needs_student: bool) -> InversionStep:
        step = super().forward_step(labels, images, needs_student)
        if self.config.scr:
            # The positive view of each image for L_scr; BN statistics come from the first view only.
            self._positive_features = self.teacher.features(self.teacher_view(images))
        return step

    def inversion_losses(self, step: InversionStep) -> dict[str, torch.Tensor]:
        """Named, weighted terms of Eq. 12: cls/bn/adv (lambda2 L_gMI), scr (lambda1), zcr (lambda3)."""
        cfg = self.config
        losses = super().inversion_losses(step)  # lambda2 * (alpha L_cls + beta L_bn + gamma L_adv)
        if cfg.scr and cfg.scr_weight:
            bank = self.image_bank.all()
            negatives = self.image_head(bank) if bank is not None else None
            losses["scr"] = cfg.scr_weight * info_nce_loss(
                self.image_head(step.teacher_features), self.image_head(self._positive_features), negatives,
                cfg.contrast_temperature)
        if cfg.zcr and cfg.zcr_weight:
            positive = step.latents + cfg.latent_noise * torch.randn_like(step.latents)
            bank = self.latent_bank.all()
            negatives = self.latent_head(bank) if bank is not None else None
            losses["zcr"] = cfg.zcr_weight * info_nce_loss(
                self.latent_head(step.latents), self.latent_head(positive), negatives, cfg.contrast_temperature)
        return losses

    def update_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eq. 13 for latents and h_z, Eq. 14 for the generator and h_x."""
        zero = next(iter(losses.values())).new_zeros(())
        gmi = sum((losses[k] for k in ("cls", "bn", "adv") if k in losses), zero)
        return {"latents": gmi + losses.get("zcr", zero), "generator": gmi + losses.get("scr", zero)}

    @torch.no_grad()
    def _disagreement(self, images: torch.Tensor) -> float:
        """Eq. 15's decision-adversarial KL of the batch: how much the proxy student still has to learn."""
        self.student.eval()
        return -float(adversarial_kl_loss(self.teacher(images), self.student(images), decision_adversarial=True))

    def synthesize(self) -> Iterator[SynthBatch]:
        while True:
            labels = self.next_labels()
            images = self.invert_batch(labels)
            self.latent_bank.push(self.latents.detach())
            with torch.no_grad():
                self.image_bank.push(self.teacher.features(images))
            if self.config.select_from == 1:
                self.memory.push(images)
                self.train_proxy_student()
            else:
                self._candidates.append((self._disagreement(images), images))
                if len(self._candidates) == self.config.select_from:
                    self.memory.push(max(self._candidates, key=lambda c: c[0])[1])
                    self._candidates = []
                    self.train_proxy_student()
            self.batches_done += 1
            yield SynthBatch(images, labels)

    # -- resumability ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "latent_head": self.latent_head.state_dict(), "image_head": self.image_head.state_dict(),
            "latent_bank": self.latent_bank.state_dict(), "image_bank": self.image_bank.state_dict(),
            "candidates": [(score, images) for score, images in self._candidates],
        })
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.latent_head.load_state_dict(state["latent_head"])
        self.image_head.load_state_dict(state["image_head"])
        self.latent_bank.load_state_dict(state["latent_bank"], device=self.device)
        self.image_bank.load_state_dict(state["image_bank"], device=self.device)
        self._candidates = [(float(score), images.to(self.device)) for score, images in state["candidates"]]

"""D2CIP: Dual Contrastive Inversion with Distributional Priors (papers/d2cip.txt).

Stage 1 - distributional prior recovery (Alg. 1, Eq. 5-7). A class-conditional Gaussian mixture over the
generator's latent (:class:`synth.core.priors.ClassConditionalGMM`) is trained jointly with a generator on

    L_s1 = alpha * L_cls + beta * L_bn                                                         (Eq. 6)

sampling z by the reparameterisation of Eq. 7. The prior (and the generator it was trained with) is saved
as ``prior.pt`` inside the dataset and recorded in the manifest; ``--prior PATH`` reuses one and skips
stage 1. Stage 1 checkpoints its progress (generator, prior, both Adams, random state) every five minutes, so a
run killed during its hours at the paper preset continues from there (``Artifacts.checkpoint``).

Stage 2 - dual contrastive inversion (Alg. 2, Eq. 8-14). For every batch the generator is re-initialised,
latents are drawn from the fixed prior and optimised together with it, using

    L_zcr = InfoNCE(h_z(z), h_z(z + sigma * n); negatives B_z)                          (Eq. 10 on latents)
    L_scr = InfoNCE(h_x(f_T(v1(x'))), h_x(f_T(v2(x'))); negatives B_x)                   (Eq. 10 on images)
    L_gMI = alpha L_cls + beta L_bn + gamma L_adv          (Eq. 4, L_adv decision-adversarial as Eq. 15)
    latents and h_z minimise  L_s2-z = lambda2 L_gMI + lambda3 L_zcr                                (Eq. 13)
    generator and h_x minimise L_s2-G = lambda1 L_scr + lambda2 L_gMI                               (Eq. 14)

Each term declares the groups it updates (L_gMI: generator and latents; L_scr: generator and h_x; L_zcr:
latents and h_z), so the update engine gives every group exactly its Eq. 13 or Eq. 14 gradient. The
finished batch joins the memory banks B_z (latents) and B_x (images, kept as the teacher's features of
them - the teacher is frozen, so this equals re-encoding the stored images, at a fraction of the cost).
Hyperparameters default to Table 12.

Appendix A.8: "in each training cycle, 300 batches of 256 synthetic samples are generated, and the most
informative batch is selected using the decision adversarial loss L_adv to guide knowledge distillation".
``--select-from N`` does that: N batches are inverted for the same labels, all join the contrastive banks,
and only the one on which teacher and proxy student disagree most (the largest decision-adversarial KL,
Eq. 15) is stored and replayed to the proxy student. ``--cycles C`` stores C such batches (the run's image
count becomes C x batch size unless ``--num-images`` is given). The default, N = 1, stores every batch.

Readings where the paper is silent or ambiguous (each chosen because it is the one that can work):

* "theta_G is re-initialized" at every batch (Sec. 3.2; Alg. 2 line 5): **fresh random weights**, as the
  paper writes; the prior then only places each batch's starting latents. Measured against restoring the
  stage-1 generator instead (``--reset-generator initial``, this toolkit's earlier reading: "the prior is a
  distribution over that generator's latent space"), on the miniature's ResNet-8 teacher at the paper preset
  (1,024 images, seeds 0-2, the same stage-1 priors): restored, every batch repeats the few images per class
  that the stage-1 generator learnt to make from any latent (mode collapse: 99% teacher agreement, students
  45.68% +- 7.05); re-initialised, 74.93% +- 1.43, every seed 23-36 points ahead (docs/results.md). The CPU preset keeps
  ``initial``: five steps a batch cannot train a fresh generator (at 10 minutes on the shipped teacher, seeds
  2-4: re-initialised 18.97% +- 1.92, restored 77.40% +- 1.35; pipelines/results/fmnist32-cpu-d2cip-generator-reset).
* Without the cGMM (``--no-cgmm``, Table 3's "w/o cGMM" row) there is no stage 1 at all: latents are drawn
  from N(0, I), and the generator is freshly (randomly) initialised for every batch, at every preset (with
  no stage-1 generator, ``initial`` means a fresh one too).
* The latent views: anchor h_z(z), positive h_z(z + sigma * n) with sigma = ``latent_noise``; the image
  views: two random crops/flips of the same image. h_x trains with the generator's learning rate, h_z with
  the latents'.
* The two views go through the teacher as two forward passes, not one of the concatenated batch: Eq. 13
  needs the latents' gradient of L_gMI without L_scr, a second backward pass that then only traverses the
  first view (measured in docs/performance.md).
* Stage 1's teacher sees the same random crop/flip view as stage 2 (``--augment-views``, on by default), where
  Alg. 1 writes y' = theta_T(x') with no view: the prior is fitted under the views stage 2 will use it
  with. ``--no-augment-views`` gives Alg. 1 literally (both stages). Kept without a separate measurement: the
  CPU preset (docs/equal-wall-time.md) and every D2CIP row in ``pipelines/results`` were measured with it.
* The prior learns at ``prior_lr`` 1e-2, the generator at ``generator_lr`` 1e-3, where Alg. 1 writes one eta
  for both (Table 12 gives none): the mixture means must travel across the latent space (unit scale) while
  the generator only adjusts, and the prior's rate is an option (``--prior-lr 1e-3`` is Alg. 1's one eta).
* h_x and h_z keep their weights across batches (Alg. 2 initialises only theta_G per batch) but get a fresh
  Adam every batch, as the generator does (Alg. 2 writes plain gradient steps with one eta, so no optimiser
  state is the paper's; a fresh Adam per batch is CMI's per-round optimiser, and keeps resume exact).
* Eq. 15's temperature is tau = 1: Table 12 gives tau only for the contrastive loss (0.1), and the
  decision-adversarial KL of CMI's public code, which Eq. 15 follows ("Following Fang et al. (2021a)"), is
  ``kldiv(s_out, t_out)`` at its default T = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm import tqdm

import zoo
from synth.core.generators import ProjectionHead
from synth.core.hooks import recording
from synth.core.inversion import GeneratorInversion, InversionStep
from synth.core.inversion_config import InversionConfig, ResetMode
from synth.core.losses import adversarial_kl_loss, bn_statistics_loss, class_prior_loss, info_nce_loss
from synth.core.memory import MemoryBank
from synth.core.priors import ClassConditionalGMM, StandardNormalPrior
from synth.core.protocol import Artifacts, LossPlugin, SynthBatch
from synth.core.updates import ParamGroup, Term, UpdateEngine, make_optimizers, term

PRIOR_FILE = "prior.pt"


@dataclass
class D2CIPConfig(InversionConfig):
    """D2CIP hyperparameters (Table 12); the inversion core's options keep their meaning."""

    # Chosen at equal wall time (docs/equal-wall-time.md): a short stage 1 and 5 steps per batch at a larger latent
    # rate make ~5x the images of the equal-image preset (100 / 20 / 1e-3) in the same minutes, and the student
    # gains far more from the images than it loses from the shorter inversion.
    # Five steps cannot train a fresh generator: the CPU preset starts each batch from stage 1's (module docstring).
    cpu_budget: ClassVar[dict[str, Any]] = {"batch_size": 64, "inversion_steps": 5, "kd_steps": 5,
                                            "prior_iterations": 50, "latent_lr": 0.02, "reset_generator": "initial"}

    num_components: int = field(default=5, metadata={"help": "K: Gaussian components per class"})
    learnable_weights: bool = field(default=True, metadata={
        "help": "learn the mixture weights pi_k (Gumbel-softmax); --no-learnable-weights fixes them at 1/K"})
    prior_iterations: int = field(default=10_000, metadata={"help": "stage-1 iterations (Table 12: 10,000)"})
    prior_lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of the GMM parameters in stage 1"})
    prior: str = field(default="", metadata={"help": "reuse this prior.pt (from any D2CIP dataset) and skip stage 1"})
    scr_weight: float = field(default=0.8, metadata={"help": "lambda1: weight of the image contrastive loss L_scr"})
    gmi_weight: float = field(default=1.0, metadata={"help": "lambda2: weight of L_gMI"})
    zcr_weight: float = field(default=1.0, metadata={"help": "lambda3: weight of the latent contrastive loss L_zcr"})
    contrast_temperature: float = field(default=0.1, metadata={"help": "tau: InfoNCE temperature"})
    latent_noise: float = field(default=0.1, metadata={
        "help": "sigma of the Gaussian perturbation of latent positives"})
    bank_size: int = field(default=4096, metadata={"help": "capacity of each memory bank (B_z, B_x)"})
    cgmm: bool = field(default=True, metadata={
        "help": "stage 1 and its class-conditional GMM prior; --no-cgmm: no stage 1, N(0, I) latents and a fresh "
                "random generator per batch (Table 3's w/o cGMM)"})
    scr: bool = field(default=True, metadata={"help": "image-level contrastive loss L_scr; --no-scr drops it"})
    zcr: bool = field(default=True, metadata={"help": "latent-level contrastive loss L_zcr; --no-zcr drops it"})
    select_from: int = field(default=1, metadata={
        "help": "A.8: invert N batches per stored batch and keep the most informative (largest Eq. 15 "
                "disagreement); 1 stores every batch"})
    cycles: int = field(default=0, metadata={
        "help": "A.8's number of cycles: stored batches, i.e. --num-images = cycles x batch size (0: use "
                "--num-images)"})
    # Table 12 / CMI defaults that differ from plain gMI.
    decision_adversarial: bool = field(default=True, metadata={
        "help": "restrict L_adv to samples where teacher and proxy student agree (Eq. 15)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_components < 1 or self.select_from < 1 or self.bank_size < 1:
            raise ValueError("num_components, select_from and bank_size must be at least 1")
        if self.prior_iterations < 0 or self.cycles < 0:
            raise ValueError("prior_iterations and cycles must be >= 0")
        if self.prior and not self.cgmm:
            raise ValueError("--prior gives a cGMM prior; it cannot be used with --no-cgmm")


class D2CIP(GeneratorInversion):
    name = "d2cip"
    summary = "D2CIP: class-conditional GMM prior + dual (latent and image) contrastive inversion"
    paper = "Dual Contrastive Inversion with Distributional Priors (D2CIP), papers/d2cip.txt"
    config_class = D2CIPConfig
    config: D2CIPConfig
    default_reset: ResetMode = "random"  # "theta_G is re-initialized" every batch (module docstring: measured)

    def __init__(self, teacher: zoo.Classifier, config: D2CIPConfig, device: torch.device,
                 plugins: tuple[LossPlugin, ...] | list[LossPlugin] = (), acceleration: zoo.Acceleration | None = None):
        super().__init__(teacher, config, device, plugins, acceleration)
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

    @classmethod
    def planned_images(cls, config: D2CIPConfig) -> int | None:
        return config.cycles * config.batch_size if config.cycles else None

    @property
    def gmi_scale(self) -> float:
        return self.config.gmi_weight

    def reset_mode(self) -> ResetMode:
        mode = super().reset_mode()
        # "initial" is stage 1's generator; without a stage 1 (w/o cGMM) each batch draws a fresh one instead.
        return "random" if mode == "initial" and not self.config.cgmm else mode

    def teacher_view_count(self) -> int:
        return 2 if self.config.scr and self.config.scr_weight else 1

    fuse_teacher_views = False  # see the module docstring: the Eq. 13 pass then reads only the first view

    def _teacher_feature_dim(self) -> int:
        with torch.no_grad():
            probe = torch.zeros(2, *self.teacher.input_shape, device=self.device)
            return int(self.teacher.features(probe).shape[1])

    # -- stage 1 -----------------------------------------------------------------------------------------

    def prepare(self, artifacts: Artifacts) -> None:
        """Stage 1 (Alg. 1), unless there is no cGMM, ``--prior`` is given, or this dataset already holds its
        prior (a resume). A reused prior is copied into the dataset too, so every dataset carries the prior
        that made it."""
        if not self.config.cgmm:
            return
        stored = artifacts.path(PRIOR_FILE)
        if stored is not None:
            self.load_prior(stored)
        elif self.config.prior:
            self.load_prior(Path(self.config.prior))
            artifacts.save(PRIOR_FILE, self.save_prior)
        else:
            self.recover_prior(artifacts)
            artifacts.save(PRIOR_FILE, self.save_prior)
        self.initial_generator_state = {k: v.detach().clone() for k, v in self.generator.state_dict().items()}

    def recover_prior(self, artifacts: Artifacts) -> None:
        """Alg. 1: jointly train generator and prior on L_s1 = alpha L_cls + beta L_bn (Eq. 6). The progress is
        offered to ``artifacts`` (checkpointed every few minutes) and a killed run's is continued, so a
        paper-preset stage 1 (10,000 iterations, hours on a CPU) survives a kill."""
        cfg = self.config
        groups = {"generator": ParamGroup(list(self.generator.parameters()), cfg.generator_lr),
                  "prior": ParamGroup(list(self.prior.parameters()), cfg.prior_lr)}
        optimizers = make_optimizers(groups)
        engine = UpdateEngine()
        self.generator.train()
        start = artifacts.restore_progress(lambda state: self.load_stage1_state(state, optimizers)) or 0
        bar = tqdm(range(start, cfg.prior_iterations), desc="d2cip stage 1: prior", unit="it", leave=False,
                   initial=start, total=cfg.prior_iterations, dynamic_ncols=True,
                   disable=not self.show_progress or cfg.prior_iterations < 20 or None)
        for iteration in bar:
            if self.prepare_time_is_up():  # a safe point: the prior so far is a prior, saved with the dataset
                self.prepare_report = {"stage1_iterations": iteration, "stage1_iterations_asked": cfg.prior_iterations,
                                       "stopped_by": "time_budget"}
                break
            labels = torch.randint(self.num_classes, (cfg.batch_size,), device=self.device)
            with self.acceleration.autocast():
                images = self.generate(self.prior.sample(labels, relaxed=True), labels)
                with recording(self.bn_hook):
                    logits = self.teacher(self.teacher_view(images)).float()
            terms = self.stage1_terms(logits, labels)
            engine.apply(terms, groups, optimizers, self.grad_scaler)
            if iteration % 10 == 0:
                bar.set_postfix({k: f"{float(t.value.detach()):.3g}" for k, t in terms.items()})
            artifacts.checkpoint(lambda done=iteration + 1: self.stage1_state(done, optimizers))
        bar.close()

    def stage1_state(self, iterations_done: int, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
        """Everything stage 1 needs to continue after ``iterations_done`` iterations."""
        return {"iterations_done": iterations_done, "prior": self.prior.state_dict(),
                "generator": self.generator.state_dict(),
                "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                "grad_scaler": self.grad_scaler.state_dict()}  # empty unless fp16

    def load_stage1_state(self, state: dict[str, Any], optimizers: dict[str, torch.optim.Optimizer]) -> int:
        """Restores :meth:`stage1_state`; returns the iterations already done."""
        self.prior.load_state_dict(state["prior"])
        self.generator.load_state_dict(state["generator"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        if state.get("grad_scaler"):
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        return int(state["iterations_done"])

    def stage1_terms(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Term]:
        """Eq. 6, both terms updating the generator and the prior."""
        cfg = self.config
        terms = {"cls": term(cfg.class_weight * class_prior_loss(logits, labels), "generator", "prior")}
        if self.bn_hook is not None:
            terms["bn"] = term(cfg.bn_weight * bn_statistics_loss(self.bn_hook), "generator", "prior")
        return terms

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
        if not isinstance(saved, dict) or "prior" not in saved:
            raise ValueError(f"{path} is not a D2CIP prior file (no 'prior' entry)")
        expected = {"num_classes": self.num_classes, "latent_dim": self.config.latent_dim,
                    "generator_width": self.config.generator_width, "cgmm": True,
                    "image_shape": list(self.teacher.input_shape)}
        for key, value in expected.items():
            if saved.get(key) != value:
                raise ValueError(f"prior {path} was made with {key}={saved.get(key)!r}; this run needs {value!r}")
        prior_config = saved.get("prior_config")
        components = prior_config.get("num_components") if isinstance(prior_config, dict) else None
        if components != self.config.num_components:
            raise ValueError(f"prior {path} has K={components} components; pass --num-components {components}")
        try:
            self.prior.load_state_dict(saved["prior"])
            self.generator.load_state_dict(saved["generator"])
        except (KeyError, TypeError, RuntimeError) as error:
            raise ValueError(f"{path} is not a D2CIP prior for this run: {error!r}") from error

    # -- stage 2 -----------------------------------------------------------------------------------------

    def sample_latents(self, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.prior.sample(labels, relaxed=False)

    def begin_batch(self, labels: torch.Tensor) -> dict[str, ParamGroup]:
        groups = super().begin_batch(labels)
        if self.teacher_view_count() == 2:
            groups["image_head"] = ParamGroup(list(self.image_head.parameters()), self.config.generator_lr)
        if self.uses_zcr():
            groups["latent_head"] = ParamGroup(list(self.latent_head.parameters()), self.config.latent_lr)
        return groups

    def uses_zcr(self) -> bool:
        return bool(self.config.zcr and self.config.zcr_weight)

    def losses(self, step: InversionStep) -> dict[str, Term]:
        """Eq. 12's terms: lambda2 L_gMI (cls/bn/adv) updates generator and latents, lambda1 L_scr the generator
        and h_x (Eq. 14), lambda3 L_zcr the latents and h_z (Eq. 13)."""
        cfg = self.config
        terms = self.gmi_terms(step)
        if self.teacher_view_count() == 2:
            bank = self.image_bank.all()
            negatives = self.image_head(bank) if bank is not None else None
            scr = info_nce_loss(self.image_head(step.teacher_features[0]), self.image_head(step.teacher_features[1]),
                                negatives, cfg.contrast_temperature)
            terms["scr"] = term(cfg.scr_weight * scr, "generator", "image_head")
        if self.uses_zcr():
            positive = step.latents + cfg.latent_noise * torch.randn_like(step.latents)
            bank = self.latent_bank.all()
            negatives = self.latent_head(bank) if bank is not None else None
            zcr = info_nce_loss(self.latent_head(step.latents), self.latent_head(positive), negatives,
                                cfg.contrast_temperature)
            terms["zcr"] = term(cfg.zcr_weight * zcr, "latents", "latent_head")
        return terms

    def after_inversion(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Alg. 2 lines 20-21: every inverted batch joins the contrastive banks."""
        self.latent_bank.push(self.latents.detach())
        with torch.no_grad(), self.acceleration.autocast():
            self.image_bank.push(self.teacher.features(self.acceleration.tensor(images)).float())

    @torch.no_grad()
    def informativeness(self, images: torch.Tensor) -> float:
        """Eq. 15's decision-adversarial KL between teacher and proxy student on the batch: how much the
        proxy student still has to learn from it (A.8's selection score; larger is more informative)."""
        self.student.eval()
        with self.acceleration.autocast():
            teacher_logits = self.teacher(images).float()
            student_logits = self.student(images).float()
        return -float(adversarial_kl_loss(teacher_logits, student_logits, decision_adversarial=True))

    def next_batch(self) -> SynthBatch:
        """A.8: the most informative of ``select_from`` batches inverted for the same labels."""
        if self.config.select_from == 1:
            return super().next_batch()
        labels = self.next_labels()
        best: tuple[float, torch.Tensor] | None = None
        for _ in range(self.config.select_from):
            images = self.invert_batch(labels)
            self.after_inversion(images, labels)
            score = self.informativeness(self.acceleration.tensor(images))
            if best is None or score > best[0]:
                best = (score, images)
        assert best is not None
        return SynthBatch(best[1], labels)

    # -- resumability ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "latent_head": self.latent_head.state_dict(), "image_head": self.image_head.state_dict(),
            "latent_bank": self.latent_bank.state_dict(), "image_bank": self.image_bank.state_dict(),
        })
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.latent_head.load_state_dict(state["latent_head"])
        self.image_head.load_state_dict(state["image_head"])
        self.latent_bank.load_state_dict(state["latent_bank"], device=self.device)
        self.image_bank.load_state_dict(state["image_bank"], device=self.device)

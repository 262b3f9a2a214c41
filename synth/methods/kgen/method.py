"""K-Gen: key-region, lower- and multi-resolution data-free generation (papers/k-gen.txt).

``kgen-s`` generates at one resolution, ``kgen`` at several (Eq. 4, Eq. 7). Per batch (one iteration I of Alg. 1):
the noisy layer Z is re-initialised (line 5), the class representatives f_y of the batch's labels go through
Z into the resolution's generator G (Eq. 1, Table 7), and G and Z take g = ``inversion_steps`` steps on

    L_G = a_ce L_ce + a_adv L_adv + a_bn L_bn + a_kr L_kr + a_aed L_aed                  (Eq. 10)

    L_ce, L_adv, L_bn   the gMI terms (Eq. 3; L_adv = -KL(T || S), decision-adversarial as in NAYER/Fast)
    L_kr  = sum_{h,w} max{0, M_target - M(x, y)},  M = sum_k w_k^y T_k(x) (the teacher's CAM)   (Eq. 5-6)
    L_aed = max{0, r_o - MSE(f_S(x), f_y)}                                                      (Eq. 11)

then the batch is stored, joins the memory pool M (line 9), and the proxy student takes S = ``kd_steps``
steps on M with L_S = L_KL + a_ed L_ed, L_ed = max{0, MSE(f_S(x), f_y) - r_i} (Eq. 8-9). Defaults: Table 8's
CIFAR row (K-Gen-S 28x28 x 260, K-Gen [28, 32] x [130, 100], g = 40, a_ce 0.5, a_bn 10, a_adv 1.3, a_kr 0.1,
a_ed 10, a_aed 5), Adam lr 4e-3 (C.2), target mask G(1,2) (Table 20); the resolutions follow the teacher's
input size (:mod:`.config`). G's Adam persists with G (per resolution, saved in the resume state).

Class representatives f_y (Sec. 3.4): ``--class-embedding text`` embeds ``--prompt`` with each class name of the
teacher's card through ``--text-encoder`` (:mod:`.text_embeddings`), cached in the dataset as
``class_embeddings.pt``; ``centre`` takes the mean teacher penultimate feature of each class over the first
stored batches (the paper: "from the first batch"; re-estimated after every batch, with the radii: see
:class:`.embedding_diversity.ClassCentres`). How often L_aed's hinge is active is counted (``aed_activity``);
a run warns when it never is. CAM, masks and the ED losses live in
:mod:`.cam` and :mod:`.embedding_diversity`; Z and G in :mod:`.noisy_generator`.

Readings where the paper is silent (each the one that works, and why):

* Generator schedule: Alg. 1 initialises G once and never again; only Z is re-initialised per iteration. So
  ``--reset-generator auto`` keeps G for the run (``random`` re-draws it per batch, as CMI).
* In ``centre`` mode the generator still needs an input before any centre exists: each class gets a fixed
  random code (N(0, I), teacher-feature sized, seeded by the run) as its generator input; the centres serve as
  the ED representatives from the moment every class has been seen (until then L_ed and L_aed are off).
* Eq. 11 writes the student's embedding, the prose says the teacher's: we use the student's (Eq. 11 as
  written) - the in-out game of Fig. 2 is between the student pulling old data in and the generator pushing
  new data out *in the same space*. Embeddings are projected to the representatives' size and L2-normalised
  (see :mod:`.embedding_diversity`). A replayed image's class is the teacher's argmax. L_aed needs the
  proxy student's features, so it is on whenever the student has learnt, also with ``--adv-weight 0``.
* Radii: given ``--inner-radius``/``--outer-radius`` win; 0 (default) derives r_i = d_min / 2, r_o = d_min from
  the representatives in use (Table 14's rule; its 0.015/0.03 belong to the paper's encoder).
* The teacher sees a random shift (4 px at 32x32, scaled with the resolution) and flip, NAYER's augmentation;
  a shift keeps the object's scale, so the centred target mask still means "the centre". L_kr is computed on
  that view, on the CAM's own grid (7x7 for a WRN at 28x28), summed over the grid, averaged over the batch.
* ``--preset cpu`` departs from Table 8 in one loss weight, a_bn = 1 instead of 10: the paper's a_bn / a_ce = 20
  assumes E x I = 8,000 generator iterations (Table 8), and in the CPU budget's 8 batches the generator never
  reaches the class prior. Measured on the shipped teacher (batch 32, 10 steps, first two batches): the teacher
  agrees with the asked class on 19-28 % of the images with a_bn = 10, 72 % with a_bn = 1 (gmi: 78-84 %); the
  same runs without L_kr reach 31 %. That is agreement, not accuracy: the project's equal-image benchmark
  trains a better student *without* L_kr (58.78 % against 53.27 %), so Table 4's gain is not reproduced here.
* A torchvision ViT teacher (no CAM, Sec. 3.3) runs through
  :class:`~zoo.architectures.fewer_patches_vit.FewerPatchesViT`
  (A.1): fewer patches with centre-biased position-embedding windows, the [CLS] attention as M(x, y), no L_bn
  (LayerNorm only). Any other teacher without a CAM is refused with :class:`~.cam.CamError`.
* Table 8's E (epochs) and I (iterations per epoch) are not options: every iteration's batch is stored (Alg. 1
  line 9), so the image count (``--num-images``, or ``--memory-ratio`` with ``--real-set-size``: Sec. 3.6, one
  l x l real image's pixels buy (l/e)^2 images at e x e) decides how many iterations run.
* Multi-resolution (Eq. 7): the resolutions take turns batch by batch, each with its own generator and batch
  size and the same fresh-Z rule; the proxy student replays from a memory pool per resolution (the pool of the
  batch just stored), since one replay batch cannot mix sizes.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import zoo
from synth.core import augment
from synth.core.inversion import GeneratorInversion, InversionStep
from synth.core.inversion_config import ResetMode
from synth.core.losses import distillation_loss
from synth.core.memory import MemoryBank
from synth.core.pixels import quantise
from synth.core.protocol import Artifacts, SynthBatch
from synth.core.updates import ParamGroup, Term, term
from synth.errors import SynthError
from zoo.architectures.fewer_patches_vit import FewerPatchesViT, is_torchvision_vit

from . import embedding_diversity as ed
from .cam import CamRecorder, cam_grid, key_region_loss, target_mask
from .config import KGenConfig, KGenSConfig
from .embedding_diversity import EmbeddingProjection, derived_radii, inner_margin_loss, outer_margin_loss
from .noisy_generator import MultiResolutionGenerator, NoisyLayer, reinitialise_generator
from .text_embeddings import cached_class_embeddings, class_prompts, resolve_encoder


class KGen(GeneratorInversion):
    name = "kgen"
    summary = "K-Gen: text-embedded noisy-layer generator, key-region CAM loss, embedding diversity, multi-resolution"
    paper = "K-Gen: Key-Region Data-Free Generation, papers/k-gen.txt"
    config_class = KGenConfig
    config: KGenConfig
    default_reset: ResetMode = "keep"  # Alg. 1: G is initialised once; Z every iteration
    persistent_groups = ("generator",)  # G's Adam lives with G; Z's is fresh with Z
    gmi_groups: tuple[str, ...] = ("generator", "noisy")

    def __init__(self, teacher: zoo.Classifier, config: KGenConfig, *args: Any, **kwargs: Any):
        self.fit_to_teacher(config, teacher)  # the resolutions follow the teacher before G is built
        super().__init__(teacher, config, *args, **kwargs)
        cfg = self.config
        self.plan = cfg.plan()
        self.resolution = self.plan[0][0]
        self.memories = {r: MemoryBank(cfg.memory_capacity) for r, _ in self.plan}
        self.memory = self.memories[self.resolution]
        self.samples_issued = 0
        self.cam: CamRecorder | None = None
        self.vit: FewerPatchesViT | None = None
        self.check(self.teacher, cfg)
        network = self.teacher.network
        if isinstance(network, FewerPatchesViT) or is_torchvision_vit(network):  # A.1: fewer patches, attention
            self.vit = network if isinstance(network, FewerPatchesViT) else FewerPatchesViT(network)
            # Installed in the teacher the run shares, so the stored logits see the same reduced-patch ViT.
            self.teacher.network = self.vit
        elif self.uses_key_region():
            self.cam = CamRecorder(self.teacher.network, self.teacher.card.arch)
        self.representatives: torch.Tensor | None = None  # f_y for L_ed / L_aed, L2-normalised [K, D]
        self.inputs: torch.Tensor | None = None  # what Z reads per class [K, D]
        self.radii: tuple[float, float] | None = None
        self.noisy: NoisyLayer | None = None
        self.projection: EmbeddingProjection | None = None
        self.centres = ed.ClassCentres(self.num_classes)
        self.aed_activity = ed.HingeActivity()

    @classmethod
    def fit_to_teacher(cls, config: KGenConfig, teacher: zoo.Classifier) -> None:  # type: ignore[override]
        config.fit_to(int(teacher.input_shape[1]))

    @classmethod
    def check(cls, teacher: zoo.Classifier, config: KGenConfig) -> None:  # type: ignore[override]
        """Before the run writes anything: a CAM (or a ViT whose patches fit the resolutions), class names for
        text representatives, and the text encoder package when it is the default."""
        network = teacher.network
        if isinstance(network, FewerPatchesViT) or is_torchvision_vit(network):
            patch = int(network.patch if isinstance(network, FewerPatchesViT) else network.patch_size)
            largest = int(network.grid * patch if isinstance(network, FewerPatchesViT) else network.image_size)
            if any(r % patch or r > largest for r in config.resolution_list()):
                raise SynthError(f"a ViT teacher ({teacher.card.arch}) takes multiples of its patch size {patch} "
                                 f"up to {largest} px; --resolutions {config.resolutions} does not fit (A.1 uses "
                                 "112 with P = 16)")
        elif config.key_region and config.kr_weight > 0:
            cam_grid(network, teacher.input_shape, next(teacher.parameters()).device, teacher.card.arch)
        if config.class_embedding == "text":
            class_prompts(teacher.card.class_names, teacher.num_classes, config.prompt)
            resolve_encoder(config.text_encoder)

    @classmethod
    def planned_images(cls, config: KGenConfig) -> int | None:  # type: ignore[override]
        """``--memory-ratio``: the data-to-memory budget of Sec. 3.6 (``--num-images`` still wins)."""
        return config.memory_budget_images()

    @classmethod
    def stores_mixed_sizes(cls, config: KGenConfig) -> bool:  # type: ignore[override]
        return len(config.resolution_list()) > 1

    def uses_bn_statistics(self) -> bool:
        """BN matching needs BatchNorm: a ViT teacher (LayerNorm only) goes without L_bn, as A.1's DeiT does."""
        return super().uses_bn_statistics() and self.teacher.has_batchnorm()

    def uses_key_region(self) -> bool:
        return self.config.key_region and self.config.kr_weight > 0

    def uses_diversity(self) -> bool:
        cfg = self.config
        return cfg.embedding_diversity and (cfg.ed_weight > 0 or cfg.aed_weight > 0)

    # -- class representatives ---------------------------------------------------------------------------

    def prepare(self, artifacts: Artifacts) -> None:
        """f_y and Z: text embeddings (from the dataset's cache, else encoded and cached), or centre-mode codes."""
        if self.config.class_embedding == "text":
            self.inputs = self._text_embeddings(artifacts)
            self.set_representatives(self.inputs)
        else:
            dim = self.teacher.feature_dim or 0
            if dim <= 0:
                raise SynthError("--class-embedding centre needs the teacher's penultimate features; this teacher "
                                 "does not expose them (TorchScript?)")
            self.inputs = torch.randn(self.num_classes, dim)
        self.inputs = self.inputs.to(self.device)
        largest = max(size for _, size in self.plan)
        self.noisy = NoisyLayer(self.inputs.shape[1], self.config.latent_dim, self.num_classes, largest).to(self.device)
        if self.uses_diversity() and self.projection is None:
            # Student embeddings -> f_y's size (text: the encoder's; centre: the teacher's feature size), learnt
            # with the proxy student; created here, before a resume restores the student's optimiser.
            student_dim = ed.feature_dim(self.student, self.channels, self.resolution, self.device)
            self.projection = EmbeddingProjection(student_dim, self.inputs.shape[1]).to(self.device)
            params = list(self.projection.parameters())
            if params:
                self.student_optimizer.add_param_group({"params": params})

    def _text_embeddings(self, artifacts: Artifacts) -> torch.Tensor:
        prompts = class_prompts(self.teacher.card.class_names, self.num_classes, self.config.prompt)
        return cached_class_embeddings(artifacts, prompts, self.config.text_encoder)

    def set_representatives(self, representatives: torch.Tensor) -> None:
        """f_y (normalised) and the radii derived from it (unless given), Table 14's rule."""
        self.representatives = F.normalize(representatives.float(), dim=1).to(self.device)
        self.radii = derived_radii(self.representatives, self.config.inner_radius, self.config.outer_radius)

    def _accumulate_centres(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Centre mode: f_y (and the radii) re-estimated from every stored batch once every class is seen."""
        with torch.no_grad():
            centres = self.centres.add(self.teacher.features(images), labels)
        if centres is not None:
            self.set_representatives(centres)

    @property
    def diversity_ready(self) -> bool:
        return self.uses_diversity() and self.representatives is not None

    # -- the core's extension points ---------------------------------------------------------------------

    @property
    def wants_student_features(self) -> bool:  # type: ignore[override]
        return self.diversity_ready and self.config.aed_weight > 0

    def wants_adversarial(self) -> bool:
        """The proxy student runs in the step for L_adv *or* L_aed (which reads its features)."""
        return (self.config.adv_weight > 0 or self.wants_student_features) and self.proxy_has_learnt

    def keep_optimizers(self, groups: dict[str, ParamGroup], suffix: str = "") -> None:
        super().keep_optimizers(groups, suffix or f"@{self.resolution}")  # one G, one Adam, per resolution

    def build_generator(self) -> nn.Module:
        cfg = self.config
        return MultiResolutionGenerator(cfg.latent_dim, self.channels, cfg.resolution_list(), cfg.generator_width)

    def reset_generator(self) -> None:
        if self.reset_mode() == "random":
            reinitialise_generator(self.generator)
        else:
            super().reset_generator()

    def next_labels(self) -> torch.Tensor:
        """This batch's resolution and classes (round robin over all samples issued so far)."""
        self.resolution, size = self.plan[self.batches_done % len(self.plan)]
        labels = (torch.arange(size) + self.samples_issued) % self.num_classes
        self.samples_issued += size
        return labels.to(self.device)

    def sample_latents(self, labels: torch.Tensor) -> torch.Tensor:
        """What Z reads: each sample's class representative (centre mode: its class code)."""
        if self.inputs is None:
            raise RuntimeError("K-Gen needs prepare() before the first batch")
        return self.inputs[labels]

    def begin_batch(self, labels: torch.Tensor) -> dict[str, ParamGroup]:
        """Alg. 1 line 5: a fresh noisy layer; G (kept, by default) and Z are what the g steps update."""
        assert self.noisy is not None
        self.reset_generator()
        self.noisy.reinitialise()
        self.latents = self.sample_latents(labels).detach()
        lr = self.config.generator_lr
        return {"generator": ParamGroup(list(self.generator.by_size[str(self.resolution)].parameters()), lr),
                "noisy": ParamGroup(list(self.noisy.parameters()), lr)}

    def generate(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        assert self.noisy is not None
        return self.acceleration.tensor(self.generator(self.noisy(latents), self.resolution))

    def teacher_view(self, images: torch.Tensor) -> torch.Tensor:
        if not self.config.augment_views:
            return images
        shift = max(1, round(4 * images.shape[-1] / 32))
        return self.acceleration.tensor(augment.random_shift_flip(images, max_shift=shift))

    def forward_step(self, index: int, labels: torch.Tensor, images: torch.Tensor,
                     needs_student: bool) -> InversionStep:
        """The core's step, with the teacher's last feature map recorded for the CAM (same forward pass); a
        ViT teacher sees each image through a centre-biased window of its position embeddings (A.1)."""
        if self.vit is not None:
            self.vit.random_offsets = True
            try:
                return super().forward_step(index, labels, images, needs_student)
            finally:
                self.vit.random_offsets = False
        if self.cam is None:
            return super().forward_step(index, labels, images, needs_student)
        with self.cam.recording():
            return super().forward_step(index, labels, images, needs_student)

    def key_region_map(self, labels: torch.Tensor) -> torch.Tensor | None:
        """M(x, y) of the step just run: the CAM (Eq. 5), or a ViT's [CLS] attention (A.1); None when off."""
        if not self.uses_key_region():
            return None
        if self.vit is not None:
            assert self.vit.cls_attention is not None
            return self.vit.cls_attention[: labels.shape[0]].float()
        assert self.cam is not None
        return self.cam.cam(labels, rows=labels.shape[0])

    def losses(self, step: InversionStep) -> dict[str, Term]:
        """Eq. 10: the gMI terms, a_kr L_kr and (once f_y and the student are ready) a_aed L_aed, on G and Z."""
        cfg, groups = self.config, self.gmi_groups
        terms = self.gmi_terms(step)
        region = self.key_region_map(step.labels)
        if region is not None:
            mask = target_mask(cfg.target_mask, region.shape[1], region.shape[2], region.device)
            terms["kr"] = term(cfg.kr_weight * key_region_loss(region, mask), *groups)
        if step.student_features is not None and self.diversity_ready and cfg.aed_weight > 0:
            assert self.representatives is not None and self.radii is not None
            assert self.projection is not None
            embedded = self.projection(step.student_features)
            targets = self.representatives[step.labels]
            self.aed_activity.record(ed.per_sample_mse(embedded, targets), self.radii[1])
            aed = outer_margin_loss(embedded, targets, self.radii[1])
            terms["aed"] = term(cfg.aed_weight * aed, *groups)
        return terms

    def proxy_student_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 8: KD + a_ed L_ed on a replayed batch; the teacher's argmax is a replayed image's class."""
        cfg = self.config
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        if not (self.diversity_ready and cfg.ed_weight > 0):
            return distillation_loss(self.student(images).float(), teacher_logits, cfg.kd_temperature)
        assert self.representatives is not None and self.radii is not None and self.projection is not None
        logits, features = self.student.forward_with_features(images)
        embedded = self.projection(features)
        ed = inner_margin_loss(embedded, self.representatives[teacher_logits.argmax(dim=1)], self.radii[0])
        return distillation_loss(logits.float(), teacher_logits, cfg.kd_temperature) + cfg.ed_weight * ed

    def end_batch(self, batch: SynthBatch) -> None:
        """Alg. 1 lines 9-11: the batch joins its resolution's pool, the proxy student replays that pool."""
        if self.config.class_embedding == "centre":
            self._accumulate_centres(batch.images, batch.labels)
        warning = self.aed_activity.end_batch()
        if warning:
            warnings.warn(warning, stacklevel=2)
        self.memory = self.memories[int(batch.images.shape[-1])]
        super().end_batch(batch)

    def remember(self, batch: SynthBatch) -> None:
        """A synthetic batch joins its resolution's pool; a plug-in's (condensed) every pool, resized to it."""
        if batch.source == "synthetic":
            return super().remember(batch)
        for size, bank in self.memories.items():
            images = F.interpolate(batch.images, size=(size, size), mode="area")
            bank.push(quantise(images), batch.labels)

    # -- resumability ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "memories": {str(r): bank.state_dict() for r, bank in self.memories.items()},
            "samples_issued": self.samples_issued,
            "inputs": self.inputs.cpu() if self.inputs is not None else None,
            "representatives": self.representatives.cpu() if self.representatives is not None else None,
            "centre_sums": self.centres.sums, "centre_counts": self.centres.counts,
            "projection": self.projection.state_dict() if self.projection is not None else None,
        })
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.projection is not None and state["projection"] is not None:
            self.projection.load_state_dict(state["projection"])
        super().load_state_dict(state)
        for r, bank in self.memories.items():
            bank.load_state_dict(state["memories"][str(r)], device=self.device)
        self.memory = self.memories[self.plan[(self.batches_done - 1) % len(self.plan)][0]]
        self.samples_issued = int(state["samples_issued"])
        if state["inputs"] is not None:
            self.inputs = state["inputs"].to(self.device)
        self.centres.sums, self.centres.counts = state["centre_sums"], state["centre_counts"]
        if state["representatives"] is not None:
            self.set_representatives(state["representatives"])


class KGenS(KGen):
    name = "kgen-s"
    summary = "K-Gen-S: K-Gen at a single (lower) resolution"
    config_class = KGenSConfig
    config: KGenSConfig

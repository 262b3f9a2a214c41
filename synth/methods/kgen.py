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
a_ed 10, a_aed 5), Adam lr 4e-3 (C.2), target mask G(1,2) (Table 20).

Class representatives f_y (Sec. 3.4): ``--class-embedding text`` embeds ``--prompt`` with each class name of the
teacher's card through ``--text-encoder`` (:mod:`synth.text_embeddings`), cached in the dataset as
``class_embeddings.pt``; ``centre`` takes the mean teacher penultimate feature of each class over the first
stored batch(es) ("the mean of the embeddings in T from the first batch"). CAM, masks and the ED losses live in
:mod:`synth.cam` and :mod:`synth.embedding_diversity`; Z and G in :mod:`synth.noisy_generator`.

Readings where the paper is silent (each the one that works, and why):

* Generator schedule: Alg. 1 initialises G once and never again; only Z is re-initialised per iteration. So
  ``--reset-generator auto`` keeps G for the run (``random`` re-draws it per batch, as CMI).
* In ``centre`` mode the generator still needs an input before any centre exists: each class gets a fixed
  random code (N(0, I), teacher-feature sized, seeded by the run) as its generator input; the centres serve as
  the ED representatives from the moment every class has been seen (until then L_ed and L_aed are off).
* Eq. 11 writes the student's embedding, the prose says the teacher's: we use the student's (Eq. 11 as
  written) - the in-out game of Fig. 2 is between the student pulling old data in and the generator pushing
  new data out *in the same space*. Embeddings are projected to the representatives' size and L2-normalised
  (see :mod:`synth.embedding_diversity`). A replayed image's class is the teacher's argmax (the pool keeps
  images, not labels).
* Radii: given ``--inner-radius``/``--outer-radius`` win; 0 (default) derives r_i = d_min / 2, r_o = d_min from
  the representatives in use (Table 14's rule; its 0.015/0.03 belong to the paper's encoder).
* The teacher sees a random shift (4 px at 32x32, scaled with the resolution) and flip, NAYER's augmentation;
  a shift keeps the object's scale, so the centred target mask still means "the centre". L_kr is computed on
  that view, on the CAM's own grid (7x7 for a WRN at 28x28), summed over the grid, averaged over the batch.
* ``--preset cpu`` departs from Table 8 in one loss weight, a_bn = 1 instead of 10: the paper's a_bn / a_ce = 20
  assumes E x I = 8,000 generator iterations (Table 8), and in the CPU budget's 8 batches the generator never
  reaches the class prior. Measured on the shipped teacher (batch 32, 10 steps, first two batches): the teacher
  agrees with the asked class on 19-28 % of the images with a_bn = 10, 72 % with a_bn = 1 (gmi: 78-84 %). The
  same runs without L_kr reach 31 %: the key-region loss is what makes so few steps work (Table 4's finding).
* Multi-resolution (Eq. 7): the resolutions take turns batch by batch, each with its own generator and batch
  size and the same fresh-Z rule; the proxy student replays from a memory pool per resolution (the pool of the
  batch just stored), since one replay batch cannot mix sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import augment
from ..base import Artifacts, SynthBatch
from ..cam import CamRecorder, cam_grid, key_region_loss, parse_mask, target_mask
from ..embedding_diversity import EmbeddingProjection, derived_radii, inner_margin_loss, outer_margin_loss
from ..errors import SynthError
from ..inversion import GeneratorInversion, InversionConfig, InversionStep, ResetMode
from ..losses import distillation_loss
from ..memory import MemoryBank
from ..noisy_generator import MultiResolutionGenerator, NoisyLayer, reinitialise_generator
from ..text_embeddings import DEFAULT_PROMPT, DEFAULT_TEXT_ENCODER, class_prompts, encode_texts
from ..updates import ParamGroup, Term, term

EMBEDDINGS_FILE = "class_embeddings.pt"


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{what} must list positive integers, got {text!r}")
    return values


@dataclass
class KGenConfig(InversionConfig):
    """K-Gen (multi-resolution) hyperparameters: Table 8, CIFAR row; the core's options keep their meaning."""

    # bn_weight 1 (not Table 8's 10) under the CPU budget: see the module docstring.
    cpu_budget: ClassVar[dict[str, Any]] = {"batch_size": 64, "batch_sizes": "64,50", "inversion_steps": 10,
                                            "kd_steps": 5, "latent_dim": 256, "bn_weight": 1.0}

    resolutions: str = field(default="28,32", metadata={
        "help": "E: comma-separated resolutions to generate at, each divisible by 4 (Table 8: 28,32)"})
    batch_sizes: str = field(default="130,100", metadata={
        "help": "synthetic batch size per resolution (Table 8: 130,100); empty: --batch-size for each"})
    batch_size: int = field(default=130, metadata={
        "help": "images per batch where --batch-sizes gives none, and the proxy student's replay batch"})
    inversion_steps: int = field(default=40, metadata={"help": "g: generator steps per batch (Table 8: 40)"})
    kd_steps: int = field(default=20, metadata={
        "help": "S: proxy-student steps per stored batch (Table 8: 2 x d_r, d_r the memory ratio in %)"})
    latent_dim: int = field(default=1000, metadata={"help": "size of the noisy layer's output, G's input (Table 7)"})
    generator_lr: float = field(default=4e-3, metadata={"help": "Adam learning rate of G and Z (C.2)"})
    latent_lr: float = field(default=0.0, metadata={"help": "unused: K-Gen has no free latents (Z is learnt)"})
    class_weight: float = field(default=0.5, metadata={"help": "a_ce: weight of L_ce (Table 8)"})
    bn_weight: float = field(default=10.0, metadata={"help": "a_bn: weight of L_bn (Table 8)"})
    adv_weight: float = field(default=1.3, metadata={"help": "a_adv: weight of L_adv (Table 8)"})
    decision_adversarial: bool = field(default=True, metadata={
        "help": "L_adv only where teacher and proxy student agree (NAYER's and Fast's adversarial term)"})
    key_region: bool = field(default=True, metadata={
        "help": "the key-region loss L_kr (Eq. 5-6); --no-key-region is Table 4's ablation"})
    kr_weight: float = field(default=0.1, metadata={"help": "a_kr: weight of L_kr (Table 8, Table 11)"})
    target_mask: str = field(default="G(1,2)", metadata={
        "help": "M_target (Table 20): G(peak,sigma) Gaussian on the CAM grid, or Full(value)"})
    embedding_diversity: bool = field(default=True, metadata={
        "help": "the embedding-diversity game L_ed / L_aed (Eq. 8-11); --no-embedding-diversity drops both"})
    ed_weight: float = field(default=10.0, metadata={"help": "a_ed: weight of L_ed on the proxy student (Table 8)"})
    aed_weight: float = field(default=5.0, metadata={"help": "a_aed: weight of L_aed on the generator (Table 8)"})
    inner_radius: float = field(default=0.0, metadata={
        "help": "r_i of L_ed; 0: half the smallest pairwise MSE between the class representatives"})
    outer_radius: float = field(default=0.0, metadata={
        "help": "r_o of L_aed; 0: the smallest pairwise MSE between the class representatives"})
    class_embedding: Literal["text", "centre"] = field(default="text", metadata={
        "help": "f_y: label-text embeddings, or class centres of the teacher's penultimate features"})
    text_encoder: str = field(default=DEFAULT_TEXT_ENCODER, metadata={
        "help": "sentence encoder for f_y: the offline MiniLM package, a local folder, or a cached hub id"})
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "text embedded per class; {name}: the class name"})
    memory_ratio: float = field(default=0.0, metadata={
        "help": "d_r (Sec. 3.6): synthesise this fraction of --real-set-size, counted in pixels of "
                "--memory-resolution images (0.1 = ten percent); sets the image count when --num-images is not given"})
    real_set_size: int = field(default=0, metadata={
        "help": "images in the real training set --memory-ratio is a fraction of (Fashion-MNIST: 60000)"})
    memory_resolution: int = field(default=32, metadata={
        "help": "l: the real images' side; one l x l image costs as much memory as (l/e)^2 images at e x e"})

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = self.resolution_list()
        if any(r % 4 for r in sizes) or len(set(sizes)) != len(sizes):
            raise ValueError(f"resolutions must be distinct and divisible by 4, got {self.resolutions!r}")
        if self.batch_sizes and len(_ints(self.batch_sizes, "batch_sizes")) != len(sizes):
            raise ValueError(f"batch_sizes {self.batch_sizes!r} needs one size per resolution ({self.resolutions})")
        parse_mask(self.target_mask)
        if self.memory_ratio < 0 or self.real_set_size < 0 or self.memory_resolution <= 0:
            raise ValueError("memory_ratio and real_set_size must be >= 0, memory_resolution positive")
        if self.memory_ratio > 0 and not self.real_set_size:
            raise ValueError("--memory-ratio is a fraction of the real training set: give --real-set-size too")
        if min(self.kr_weight, self.ed_weight, self.aed_weight, self.inner_radius, self.outer_radius) < 0:
            raise ValueError("loss weights and radii must be >= 0")

    def resolution_list(self) -> tuple[int, ...]:
        return _ints(self.resolutions, "resolutions")

    def memory_budget_images(self) -> int | None:
        """Sec. 3.6: the images d_r x N real l x l images' worth of pixels buys, in the plan's mix of resolutions
        (one turn of the plan: sum b_e images costing sum b_e (e/l)^2 full-size images); None without a ratio."""
        if not self.memory_ratio:
            return None
        plan = self.plan()
        images_per_turn = sum(size for _, size in plan)
        cost_per_turn = sum(size * (r / self.memory_resolution) ** 2 for r, size in plan)
        return max(1, int(self.memory_ratio * self.real_set_size * images_per_turn / cost_per_turn))

    def plan(self) -> list[tuple[int, int]]:
        """(resolution, batch size) of each batch in one turn of the resolutions."""
        sizes = _ints(self.batch_sizes, "batch_sizes") if self.batch_sizes else None
        return [(r, sizes[i] if sizes else self.batch_size) for i, r in enumerate(self.resolution_list())]


@dataclass
class KGenSConfig(KGenConfig):
    """K-Gen-S: one resolution (Table 8, CIFAR row: 28x28, batch 260)."""

    cpu_budget: ClassVar[dict[str, Any]] = {"batch_size": 64, "inversion_steps": 10, "kd_steps": 5,
                                            "latent_dim": 256, "bn_weight": 1.0}

    resolutions: str = field(default="28", metadata={"help": "the resolution to generate at (Table 8: 28)"})
    batch_sizes: str = field(default="", metadata={"help": "unused by kgen-s (see --batch-size)"})
    batch_size: int = field(default=260, metadata={"help": "synthetic batch size (Table 8: 260)"})


class KGen(GeneratorInversion):
    name = "kgen"
    summary = "K-Gen: text-embedded noisy-layer generator, key-region CAM loss, embedding diversity, multi-resolution"
    paper = "K-Gen: Key-Region Data-Free Generation, papers/k-gen.txt"
    config_class = KGenConfig
    config: KGenConfig
    default_reset: ResetMode = "keep"  # Alg. 1: G is initialised once; Z every iteration
    gmi_groups: tuple[str, ...] = ("generator", "noisy")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.plan = cfg.plan()
        self.resolution = self.plan[0][0]
        self.memories = {r: MemoryBank(cfg.memory_capacity) for r, _ in self.plan}
        self.memory = self.memories[self.resolution]
        self.samples_issued = 0
        self.cam: CamRecorder | None = None
        if self.uses_key_region():  # a teacher without a CAM is refused here, before any batch
            cam_grid(self.teacher.network, self.teacher.input_shape, self.device, self.teacher.card.arch)
            self.cam = CamRecorder(self.teacher.network, self.teacher.card.arch)
        self.representatives: torch.Tensor | None = None  # f_y for L_ed / L_aed, L2-normalised [K, D]
        self.inputs: torch.Tensor | None = None  # what Z reads per class [K, D]
        self.radii: tuple[float, float] | None = None
        self.noisy: NoisyLayer | None = None
        self.projection: EmbeddingProjection | None = None
        self._centre_sums: torch.Tensor | None = None
        self._centre_counts = torch.zeros(self.num_classes)

    @classmethod
    def planned_images(cls, config: KGenConfig) -> int | None:  # type: ignore[override]
        """``--memory-ratio``: the data-to-memory budget of Sec. 3.6 (``--num-images`` still wins)."""
        return config.memory_budget_images()

    @classmethod
    def stores_mixed_sizes(cls, config: KGenConfig) -> bool:  # type: ignore[override]
        return len(config.resolution_list()) > 1

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
            student_dim = _student_feature_dim(self.student, self.channels, self.resolution, self.device)
            self.projection = EmbeddingProjection(student_dim, self.inputs.shape[1]).to(self.device)
            params = list(self.projection.parameters())
            if params:
                self.student_optimizer.add_param_group({"params": params})

    def _text_embeddings(self, artifacts: Artifacts) -> torch.Tensor:
        cfg = self.config
        prompts = class_prompts(self.teacher.card.class_names, self.num_classes, cfg.prompt)
        cached = artifacts.path(EMBEDDINGS_FILE)
        if cached is not None and cached.exists():
            saved = torch.load(cached, map_location="cpu", weights_only=True)
            if saved.get("prompts") == prompts and saved.get("encoder") == cfg.text_encoder:
                return saved["embeddings"].float()
        embeddings = encode_texts(prompts, cfg.text_encoder)
        record = {"embeddings": embeddings, "prompts": prompts, "encoder": cfg.text_encoder}
        artifacts.save(EMBEDDINGS_FILE, lambda path: _save(record, path))
        return embeddings

    def set_representatives(self, representatives: torch.Tensor) -> None:
        """f_y (normalised) and the radii derived from it (unless given), Table 14's rule."""
        self.representatives = F.normalize(representatives.float(), dim=1).to(self.device)
        self.radii = derived_radii(self.representatives, self.config.inner_radius, self.config.outer_radius)

    def _accumulate_centres(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Centre mode: per-class mean teacher feature over stored batches until every class has one."""
        with torch.no_grad():
            features = self.teacher.features(images).float().cpu()
        if self._centre_sums is None:
            self._centre_sums = torch.zeros(self.num_classes, features.shape[1])
        self._centre_sums.index_add_(0, labels.cpu(), features)
        self._centre_counts += torch.bincount(labels.cpu(), minlength=self.num_classes).float()
        if bool((self._centre_counts > 0).all()):
            self.set_representatives(self._centre_sums / self._centre_counts[:, None])

    @property
    def diversity_ready(self) -> bool:
        return self.uses_diversity() and self.representatives is not None

    # -- the core's extension points ---------------------------------------------------------------------

    @property
    def wants_student_features(self) -> bool:  # type: ignore[override]
        return self.diversity_ready and self.config.aed_weight > 0

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
        """The core's step, with the teacher's last feature map recorded for the CAM (same forward pass)."""
        if self.cam is None:
            return super().forward_step(index, labels, images, needs_student)
        with self.cam.recording():
            return super().forward_step(index, labels, images, needs_student)

    def losses(self, step: InversionStep) -> dict[str, Term]:
        """Eq. 10: the gMI terms, a_kr L_kr and (once f_y and the student are ready) a_aed L_aed, on G and Z."""
        cfg, groups = self.config, self.gmi_groups
        terms = self.gmi_terms(step)
        if self.cam is not None:
            cam = self.cam.cam(step.labels, rows=step.labels.shape[0])
            mask = target_mask(cfg.target_mask, cam.shape[1], cam.shape[2], cam.device)
            terms["kr"] = term(cfg.kr_weight * key_region_loss(cam, mask), *groups)
        if step.student_features is not None and self.diversity_ready and cfg.aed_weight > 0:
            assert self.representatives is not None and self.radii is not None
            assert self.projection is not None
            embedded = self.projection(step.student_features)
            aed = outer_margin_loss(embedded, self.representatives[step.labels], self.radii[1])
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
        if self.config.class_embedding == "centre" and self.representatives is None:
            self._accumulate_centres(batch.images, batch.labels)
        self.memory = self.memories[int(batch.images.shape[-1])]
        super().end_batch(batch)

    # -- resumability ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "memories": {str(r): bank.state_dict() for r, bank in self.memories.items()},
            "samples_issued": self.samples_issued,
            "inputs": self.inputs.cpu() if self.inputs is not None else None,
            "representatives": self.representatives.cpu() if self.representatives is not None else None,
            "centre_sums": self._centre_sums, "centre_counts": self._centre_counts,
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
        self._centre_sums, self._centre_counts = state["centre_sums"], state["centre_counts"]
        if state["representatives"] is not None:
            self.set_representatives(state["representatives"])


class KGenS(KGen):
    name = "kgen-s"
    summary = "K-Gen-S: K-Gen at a single (lower) resolution"
    config_class = KGenSConfig
    config: KGenSConfig


def _save(record: dict[str, Any], path: Path) -> None:
    torch.save(record, path)


def _student_feature_dim(student: nn.Module, channels: int, size: int, device: torch.device) -> int:
    was_training = student.training
    student.eval()
    with torch.no_grad():
        dim = student.features(torch.zeros(1, channels, size, size, device=device)).shape[1]
    student.train(was_training)
    return int(dim)


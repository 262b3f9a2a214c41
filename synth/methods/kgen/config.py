"""K-Gen's options: Table 8's CIFAR row as defaults, the resolutions plan and the data-memory budget (Sec. 3.6).

``--resolutions`` and ``--memory-resolution`` default to the teacher's input size (:meth:`KGenConfig.fit_to`):
Table 8's row for that size where it has one (32: [28, 32] / 28; 64: [32, 48] / 32; 224: [112, 128] / 112),
else the CIFAR row scaled (the lower resolution 7/8 of the input, down to a multiple of 4; the higher the
input itself), so a run never generates above the teacher's own input. ``--batch-sizes`` stays the CIFAR row's.

The method itself, and every reading where the paper is silent, is :mod:`.method`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from synth.core.inversion_config import InversionConfig

from .cam import parse_mask
from .text_embeddings import DEFAULT_PROMPT, DEFAULT_TEXT_ENCODER

#: Table 8's resolutions by teacher input size: (K-Gen's pair, K-Gen-S's one).
TABLE8_RESOLUTIONS: dict[int, tuple[tuple[int, ...], int]] = {32: ((28, 32), 28), 64: ((32, 48), 32),
                                                               224: ((112, 128), 112)}


def default_resolutions(input_size: int, multi: bool) -> str:
    """Table 8's resolutions for a teacher of ``input_size`` px, or the CIFAR row scaled to it."""
    if input_size in TABLE8_RESOLUTIONS:
        pair, single = TABLE8_RESOLUTIONS[input_size]
    else:
        top = max(4, input_size // 4 * 4)
        single = max(4, input_size * 7 // 8 // 4 * 4)
        pair = (single, top) if single < top else (top,)
    return ",".join(map(str, pair)) if multi else str(single)


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

    resolutions: str = field(default="", metadata={
        "help": "E: comma-separated resolutions to generate at, each divisible by 4; empty: Table 8's for the "
                "teacher's input size (32 px: 28,32)"})
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
    augment_views: bool = field(default=True, metadata={
        "help": "show the teacher a random shift (4 px at 32) and flip of each image (NAYER's augmentation)"})
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
    memory_resolution: int = field(default=0, metadata={
        "help": "l: the real images' side; one l x l image costs as much memory as (l/e)^2 images at e x e; "
                "0: the teacher's input size"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolutions:
            self._check_resolutions()
        parse_mask(self.target_mask)
        if self.memory_ratio < 0 or self.real_set_size < 0 or self.memory_resolution < 0:
            raise ValueError("memory_ratio, real_set_size and memory_resolution must be >= 0")
        if self.memory_ratio > 0 and not self.real_set_size:
            raise ValueError("--memory-ratio is a fraction of the real training set: give --real-set-size too")
        if min(self.kr_weight, self.ed_weight, self.aed_weight, self.inner_radius, self.outer_radius) < 0:
            raise ValueError("loss weights and radii must be >= 0")

    def _check_resolutions(self) -> None:
        sizes = self.resolution_list()
        if any(r % 4 for r in sizes) or len(set(sizes)) != len(sizes):
            raise ValueError(f"resolutions must be distinct and divisible by 4, got {self.resolutions!r}")
        if self.batch_sizes and len(_ints(self.batch_sizes, "batch_sizes")) != len(sizes):
            raise ValueError(f"batch_sizes {self.batch_sizes!r} needs one size per resolution ({self.resolutions})")

    def fit_to(self, input_size: int) -> None:
        """Fills the teacher-dependent defaults: resolutions and memory resolution from its input size."""
        if not self.resolutions:
            self.resolutions = default_resolutions(input_size, multi=True)
            if self.batch_sizes and len(_ints(self.batch_sizes, "batch_sizes")) != len(self.resolution_list()):
                self.batch_sizes = ""  # a teacher too small for two sizes: --batch-size for the one
            self._check_resolutions()
        if not self.memory_resolution:
            self.memory_resolution = input_size

    def resolution_list(self) -> tuple[int, ...]:
        if not self.resolutions:
            raise ValueError("resolutions are not set yet: they follow the teacher (fit_to(input_size))")
        return _ints(self.resolutions, "resolutions")

    def memory_budget_images(self) -> int | None:
        """Sec. 3.6: the images d_r x N real l x l images' worth of pixels buys, in the plan's mix of resolutions
        (one turn of the plan: sum b_e images costing sum b_e (e/l)^2 full-size images); None without a ratio."""
        if not self.memory_ratio:
            return None
        if not self.memory_resolution:
            raise ValueError("memory_resolution is not set yet: it follows the teacher (fit_to(input_size))")
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

    resolutions: str = field(default="", metadata={
        "help": "the one resolution to generate at; empty: Table 8's for the teacher's input size (32 px: 28)"})
    batch_sizes: str = field(default="", metadata={
        "help": "the resolution's batch size, as one number; empty: --batch-size"})
    batch_size: int = field(default=260, metadata={"help": "synthetic batch size (Table 8: 260)"})

    def _check_resolutions(self) -> None:
        super()._check_resolutions()
        if len(self.resolution_list()) != 1:
            raise ValueError(f"kgen-s generates at one resolution, got {self.resolutions!r}; use kgen for several")

    def fit_to(self, input_size: int) -> None:
        if not self.resolutions:
            self.resolutions = default_resolutions(input_size, multi=False)
        super().fit_to(input_size)

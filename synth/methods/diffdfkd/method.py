"""DiffDFKD: teacher-guided latent editing of a pretrained diffusion model, with Latent CutMix
(papers/diffdfkd.txt).

A pretrained diffusion model (:mod:`.diffusion`: Stable Diffusion family, DiT, or a pixel-space DDPM, local
path or hub id) denoises a batch of latents for T steps. At every step t, for ``inner_steps`` updates (Sec. III-C):

    eps   = eps(z_t, t | 0) + s (eps(z_t, t | c) - eps(z_t, t | 0))                     Eq. 3 (one forward)
    x̂0_t  = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)                                       Eq. 4 (with gradients)
    x     = resize(decode(x̂0_t)) to the teacher's input
    L_inv = alpha L_bn(x) + beta L_cls(x, y) + gamma L_adv(x)                           Eq. 6-9
    z_t  <- z_t - eta grad_{z_t} L_inv                                                  Eq. 10

then (every k steps) Latent CutMix between random pairs of the batch (Eq. 11, :mod:`.cutmix`) and the
scheduler's step to z_{t-1} (Eq. 5). At t = T-k, T-2k, ..., 0 the decoded x̂0 joins the dataset (Sec. III-D:
each latent gives T/k images), with its step, timestep, prompt and the mixes it went through in its metadata.
L_bn, L_cls and L_adv are :mod:`synth.core.losses`' functions; L_adv's student is an in-loop proxy student
(:mod:`synth.core.proxy`) that learns by KD from the teacher on the stored images, as in CMI and Fast.
Distillation's CAM-alignment loss (Eq. 12) is not part of synthesis.

Readings where the paper is silent (each the one that works best here, and why):

* One UNet forward per update, as the paper claims: the scheduler step uses the model output of the last
  update's forward (computed at z_t before that update) with the updated z_t. For DDIM this moves x̂0 by
  exactly the guided change of z_t, which is the point of the edit; the public code's second forward after the
  update would double the cost. x̂0 is computed *with* gradients (the public code computes it under
  ``no_grad``, so its teacher guidance never reaches z_t).
* The update is z_t - eta * B * grad of the batch-mean loss, i.e. each latent moves by the gradient of its own
  per-sample terms whatever the batch size B (the public code runs batches of 1 with eta = 1).
* Order within a mixing step: store x̂0, then CutMix, then the scheduler step, so a stored image has had k
  steps of denoising to repair the seams of the previous mix (the paper's reason for mixing only every k
  steps). The mix is applied to z_t and to its model output with the same box, so the step of a mixed latent is
  the mix of the two latents' steps; no mix at the final step (nothing would repair it).
* The label of a mixed sample stays the asked label y of the latent that received the box: the paper adds
  (x_t^i, y) to D' for every intermediate image, and the receiving latent keeps its own condition c(y). Its
  stored logits are the teacher's on the stored image, as for every sample.
* The prompt is the paper's, "a realistic photo" plus a random subject and style modifier (Sec. IV-A): no label
  name, which is the paper's reason to set NAYER aside; ``--prompt 'a realistic photo of a {name}'`` puts the
  teacher's class names in (:mod:`.prompts`).
* Defaults follow the paper's CIFAR setting and its public code: s = 3, T = 10 DDIM steps, k = 2 (four
  intermediate images and the final one per latent), alpha = 0.1, beta = 1, gamma = 1, eta = 1, L_adv only
  on samples where teacher and proxy student agree (the public code's mask, D2CIP Eq. 15's reading), once the
  proxy student has learnt from a stored batch.
* A pixel-space DDPM has no text input: it runs unconditioned (s has no effect) and the teacher's guidance
  alone steers it to the asked class, the domain-bridging case the paper motivates; a class-conditional UNet
  takes ``--class-ids`` (the diffusion model's class for each teacher class).
* DiT (class-conditional latent): the teacher's class names are looked up among the model's own label names
  (``id2label``, case-insensitive, any comma-separated synonym); ``--class-ids`` overrides. Eq. 3's null
  condition is DiT's null class (``num_embeds_ada_norm``); the prompts are unused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

import zoo
from synth.core.hooks import recording
from synth.core.losses import adversarial_kl_loss, bn_statistics_loss, class_prior_loss
from synth.core.protocol import SynthBatch, SynthConfig, SynthesisMethod
from synth.core.proxy import ProxyStudent
from synth.errors import SynthError

from . import diffusion
from .cutmix import apply_mixes, draw_mixes
from .prompts import PromptBuilder

DEFAULT_SUBJECTS = "|close-up|centered|from the side|on a plain background|in natural light"
DEFAULT_STYLES = "|photograph|studio photo|product shot|black and white photo|film photo"


@dataclass
class DiffDFKDConfig(SynthConfig):
    """DiffDFKD's options: the paper's CIFAR settings (Sec. IV-A) and its public code's loss weights."""

    cpu_budget: ClassVar[dict[str, Any]] = {"batch_size": 8, "num_inference_steps": 10, "kd_steps": 2}

    batch_size: int = field(default=16, metadata={"help": "latents denoised together (each gives T/k images)"})
    diffusion: str = field(default="stable-diffusion-v1-5/stable-diffusion-v1-5", metadata={
        "help": "diffusers pipeline: a local directory (save_pretrained) or a hub id already in the HF cache"})
    revision: str = field(default="", metadata={"help": "hub revision of --diffusion (empty: the default branch)"})
    allow_download: bool = field(default=False, metadata={
        "help": "fetch --diffusion from the hub when it is not in the local cache"})
    precision: Literal["auto", "fp32", "fp16", "bf16"] = field(default="auto", metadata={
        "help": "the run's --precision, which also sets the diffusion model's weights (auto: bf16 on CUDA with "
                "bf16, else fp16 on CUDA; bf16 on a CPU with avx512_bf16/amx_bf16, else fp32)"})
    scheduler: Literal["ddim", "ddpm", "pipeline"] = field(default="ddim", metadata={
        "help": "sampler: DDIM (Eq. 5, deterministic), DDPM, or the pipeline's own scheduler"})
    resolution: int = field(default=0, metadata={"help": "generated image side in pixels (0: the model's own)"})
    num_inference_steps: int = field(default=10, metadata={"help": "T: denoising steps per latent"})
    guidance_scale: float = field(default=3.0, metadata={"help": "s: classifier-free guidance scale (Eq. 3)"})
    guidance: bool = field(default=True, metadata={
        "help": "teacher guidance of z_t (Eq. 10); --no-guidance: plain sampling (the ablation)"})
    inner_steps: int = field(default=1, metadata={"help": "updates of z_t per denoising step (Eq. 10)"})
    latent_lr: float = field(default=1.0, metadata={"help": "eta: step size of the z_t update (per sample)"})
    bn_weight: float = field(default=0.1, metadata={"help": "alpha: weight of L_bn (Eq. 6)"})
    class_weight: float = field(default=1.0, metadata={"help": "beta: weight of the class prior L_cls (Eq. 7)"})
    adv_weight: float = field(default=1.0, metadata={"help": "gamma: weight of L_adv (Eq. 8)"})
    adv_temperature: float = field(default=1.0, metadata={"help": "tau: temperature of L_adv (Eq. 8)"})
    decision_adversarial: bool = field(default=True, metadata={
        "help": "L_adv only where teacher and proxy student agree (the public code's mask)"})
    interval: int = field(default=2, metadata={
        "help": "k: store the decoded x̂0 at t = T-k, T-2k, ..., 0 and CutMix every k steps"})
    cutmix: bool = field(default=True, metadata={"help": "Latent CutMix (Eq. 11); --no-cutmix: the ablation"})
    cutmix_beta: float = field(default=1.0, metadata={
        "help": "box area ratio 1 - lambda with lambda ~ Beta(b, b) (1: uniform, CutMix's default)"})
    prompt: str = field(default="a realistic photo", metadata={
        "help": "prompt for text-conditioned models, label-free as the paper's (Sec. IV-A); a {name} in it is "
                "replaced by the teacher's class name (e.g. 'a realistic photo of a {name}', DM-KD's use)"})
    subjects: str = field(default=DEFAULT_SUBJECTS, metadata={
        "help": "'|'-separated subject modifiers, one drawn per image (an empty entry: none)"})
    styles: str = field(default=DEFAULT_STYLES, metadata={
        "help": "'|'-separated style modifiers, one drawn per image (an empty entry: none)"})
    negative_prompt: str = field(default="", metadata={
        "help": "the unconditional branch of Eq. 3 (empty: the null prompt)"})
    class_ids: str = field(default="", metadata={
        "help": "class-conditional model (DiT, a class-conditional UNet): its class id for each teacher class, "
                "comma-separated (DiT default: the teacher's class names looked up in the model's labels)"})
    proxy_student: str = field(default="wrn16_1", metadata={"help": "architecture of the proxy student for L_adv"})
    proxy_lr: float = field(default=0.1, metadata={"help": "SGD learning rate of the proxy student"})
    kd_steps: int = field(default=5, metadata={"help": "proxy-student KD steps after each batch (0: no L_adv)"})
    kd_temperature: float = field(default=4.0, metadata={"help": "temperature of the proxy student's KD"})
    memory_capacity: int = field(default=8192, metadata={"help": "stored images kept for the proxy's replay"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_inference_steps", "inner_steps", "interval", "memory_capacity"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.interval > self.num_inference_steps:
            raise ValueError(f"interval k={self.interval} exceeds num_inference_steps T={self.num_inference_steps}")
        if self.latent_lr < 0 or self.kd_steps < 0 or self.resolution < 0 or self.cutmix_beta <= 0:
            raise ValueError("latent_lr, kd_steps and resolution must be >= 0; cutmix_beta > 0")


def lookup_class_ids(text: str, num_classes: int, labels: dict[str, int] | None = None,
              class_names: list[str] | None = None) -> list[int]:
    """The class-conditional diffusion model's class id for each teacher class: ``--class-ids`` when given,
    else the teacher's class names looked up in the model's own label names (DiT's ImageNet synonyms)."""
    if not text and labels and class_names:
        missing = [name for name in class_names if name.strip().lower() not in labels]
        if not missing:
            return [labels[name.strip().lower()] for name in class_names]
        raise SynthError(f"the diffusion model has no class named {missing[0]!r} (nor {len(missing) - 1} other "
                         "teacher class names); give --class-ids, its class id for each teacher class")
    if not text:
        raise SynthError("this diffusion model is class-conditional: give --class-ids, the diffusion model's class "
                         f"id for each of the teacher's {num_classes} classes (comma-separated)")
    try:
        ids = [int(v) for v in text.split(",")]
    except ValueError:
        raise SynthError(f"--class-ids must be comma-separated integers, got {text!r}") from None
    if len(ids) != num_classes:
        raise SynthError(f"--class-ids has {len(ids)} ids for a teacher with {num_classes} classes")
    return ids


class DiffDFKD(SynthesisMethod):
    name = "diffdfkd"
    summary = "DiffDFKD: teacher-guided denoising of a pretrained diffusion model + Latent CutMix"
    paper = "DiffDFKD (Qi et al.), papers/diffdfkd.txt, Eq. 3-5, 9-11"
    config_class = DiffDFKDConfig
    config: DiffDFKDConfig

    @classmethod
    def identity_extras(cls, config: SynthConfig, teacher: zoo.Classifier) -> dict[str, Any]:
        """The diffusion model's identity; checks that prompts or class ids can be made for this teacher."""
        assert isinstance(config, DiffDFKDConfig)
        model = diffusion.identity(config.diffusion, config.revision or None, config.allow_download)
        if model["kind"] == "latent-text":
            PromptBuilder(config.prompt, teacher.card.class_names, teacher.num_classes, config.subjects, config.styles)
        if model["class_conditional"]:
            labels = diffusion.describe(diffusion.resolve(config.diffusion, config.revision or None))["labels"]
            names = teacher.card.class_names
            model["class_ids"] = lookup_class_ids(config.class_ids, teacher.num_classes, labels, names)
        return {"diffusion": model}

    def __init__(self, teacher: zoo.Classifier, config: DiffDFKDConfig, device: torch.device, plugins: Any = (),
                 acceleration: zoo.Acceleration | None = None):
        super().__init__(teacher, config, device, plugins, acceleration)
        folder = diffusion.resolve(config.diffusion, config.revision or None, config.allow_download)
        self.model = diffusion.load(folder, device, config.precision, config.scheduler, config.resolution)
        self.prompts = None
        if self.model.kind == "latent-text":
            self.prompts = PromptBuilder(config.prompt, teacher.card.class_names, self.num_classes, config.subjects,
                                         config.styles)
        self.class_ids = None
        if self.model.class_conditional:
            labels = diffusion.describe(folder)["labels"]
            ids = lookup_class_ids(config.class_ids, self.num_classes, labels, teacher.card.class_names)
            self.class_ids = torch.tensor(ids, device=device)
        self.proxy = ProxyStudent(teacher, config.proxy_student, device, config.proxy_lr, config.memory_capacity,
                                  config.kd_temperature)
        self.loss_trace: list[float] = []  # L_inv at each update of the last batch, in order

    def uses_bn_statistics(self) -> bool:
        return self.config.guidance and self.config.bn_weight > 0

    # -- schedule ---------------------------------------------------------------------------------------

    def decode_steps(self) -> list[int]:
        """Step indices (0 = the first, at t = T) after which x̂0 is stored: t = T-k, T-2k, ..., 0."""
        steps, k = self.config.num_inference_steps, self.config.interval
        return [i for i in range(steps) if (steps - 1 - i) % k == 0]

    def mix_steps(self) -> list[int]:
        """Step indices whose latents are CutMixed (every k steps, never the last)."""
        return self.decode_steps()[:-1] if self.config.cutmix else []

    # -- one batch --------------------------------------------------------------------------------------

    def condition(self, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[str] | None]:
        """The denoiser's conditions for ``labels`` (prompt embeddings or class ids) and the prompts used."""
        if self.prompts is not None:
            prompts = self.prompts(labels.tolist())
            negative = self.model.encode_prompts([self.config.negative_prompt] * len(prompts))
            return {"text": self.model.encode_prompts(prompts), "negative": negative}, prompts
        if self.class_ids is not None:
            return {"class_labels": self.class_ids[labels]}, None
        return {}, None

    def inversion_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_inv = alpha L_bn + beta L_cls + gamma L_adv on teacher-sized pixels (Eq. 9)."""
        cfg = self.config
        with recording(self.bn_hook):
            logits = self.teacher(images).float()
        cls = class_prior_loss(logits, labels)
        loss = cfg.class_weight * cls
        terms = {"cls": cls.detach()}  # unweighted, as the other terms
        if self.bn_hook is not None:
            bn = bn_statistics_loss(self.bn_hook)
            loss = loss + cfg.bn_weight * bn
            terms["bn"] = bn.detach()
        if cfg.adv_weight and cfg.kd_steps and self.proxy.has_learnt:
            adv = adversarial_kl_loss(logits, self.proxy(images).float(), cfg.adv_temperature,
                                      cfg.decision_adversarial)
            loss = loss + cfg.adv_weight * adv
            terms["adv"] = adv.detach()
        self.last_losses = {name: float(value) for name, value in terms.items()}
        return loss

    def teacher_pixels(self, output: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂0 (Eq. 4) decoded and resized to the teacher's input, differentiable in ``z`` and ``output``."""
        pixels = self.model.decode(self.model.predict_x0(output, z, t))
        return diffusion.to_teacher_pixels(pixels, self.channels, self.height, self.width)

    def guide(self, z: torch.Tensor, t: torch.Tensor, condition: dict[str, torch.Tensor],
              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``inner_steps`` updates of z_t by the gradient of L_inv (Eq. 10), one denoiser forward each.
        Returns the updated z_t and the model output of the last forward (used for the scheduler step)."""
        cfg = self.config
        if not cfg.guidance:
            with torch.no_grad():
                return z, self.model.model_output(z, t, condition, cfg.guidance_scale)
        for _ in range(cfg.inner_steps):
            z = z.detach().requires_grad_(True)
            output = self.model.model_output(z, t, condition, cfg.guidance_scale)
            loss = self.inversion_loss(self.teacher_pixels(output, z, t), labels)
            (grad,) = torch.autograd.grad(loss, z)
            self.loss_trace.append(float(loss.detach()))
            z = (z - cfg.latent_lr * z.shape[0] * grad).detach()
        return z, output.detach()

    def generate(self, labels: torch.Tensor) -> SynthBatch:
        """Denoises one batch of latents; returns every stored x̂0 (decode points in order, then latents)."""
        cfg, model = self.config, self.model
        n = labels.shape[0]
        condition, prompts = self.condition(labels)
        scheduler = model.scheduler
        scheduler.set_timesteps(cfg.num_inference_steps, device=self.device)
        z = torch.randn(n, *model.latent_shape, device=self.device) * scheduler.init_noise_sigma
        first_id = self.batches_done * n
        mixes: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        decode_steps, mix_steps = set(self.decode_steps()), set(self.mix_steps())
        images, metas = [], []
        self.loss_trace = []
        for i, t in enumerate(scheduler.timesteps):
            z, output = self.guide(z, t, condition, labels)
            if i in decode_steps:
                with torch.no_grad():
                    images.append(self.teacher_pixels(output, z, t))
                for j in range(n):
                    meta = {"latent": first_id + j, "step": i, "timestep": int(t), "guided": cfg.guidance,
                            "mixes": [dict(m) for m in mixes[j]]}
                    metas.append({**meta, "prompt": prompts[j]} if prompts else meta)
            if i in mix_steps and n >= 2:
                drawn = draw_mixes(n, z.shape[2], z.shape[3], cfg.cutmix_beta)
                z, output = apply_mixes(z, drawn), apply_mixes(output, drawn)
                for m in drawn:
                    mixes[m.a].append({"step": i, "partner": first_id + m.b, "box": m.box})
                    mixes[m.b].append({"step": i, "partner": first_id + m.a, "box": m.box})
            with torch.no_grad():
                z = scheduler.step(output, t, z).prev_sample
        stored = torch.cat(images).detach().float()
        return SynthBatch(stored, labels.repeat(len(images)), sample_meta=metas)

    def synthesize(self) -> Iterator[SynthBatch]:
        while True:
            batch = self.generate(self.next_labels())
            self.proxy.learn(batch.images, self.config.kd_steps, self.config.batch_size)
            self.batches_done += 1
            yield batch

    # -- resumability -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "proxy": self.proxy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.proxy.load_state_dict(state["proxy"], self.device)

"""Pretrained diffusion models for DiffDFKD: find one locally, identify it, load its parts, and run them with
gradients.

``diffusers`` (and ``transformers`` for text encoders) are imported here and only when a method calls in, so
the rest of ``synth`` never needs them. A model is named as ``from_pretrained`` names it: a local directory a
pipeline was ``save_pretrained`` into, or a hub id (with ``revision``). Nothing is downloaded unless asked
(``allow_download``): a hub id must already be in the Hugging Face cache, and when it is not the error says
so and how to provide it. Three families are supported, told apart by the pipeline's components:

==================  ========================================================  =================================
kind                components                                                condition
==================  ========================================================  =================================
``latent-text``     UNet2DConditionModel + AutoencoderKL + text encoder +      prompt embeddings; CFG with the
                    tokenizer + scheduler (Stable Diffusion family)           negative prompt (Eq. 3)
``latent-class``    DiT transformer + AutoencoderKL + scheduler (DiTPipeline)  class ids; CFG with the null class
``pixel``           UNet2DModel + scheduler (DDPM), no VAE                    none, or class ids when the UNet
                                                                              has class embeddings (no CFG)
==================  ========================================================  =================================

:class:`DiffusionModel` exposes what the guided loop needs, each with gradients when the caller enables
them: the (classifier-free guided) model output, x̂0 from it (Eq. 4) and x̂0 decoded to pixels in [0, 1].
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from synth.errors import SynthError
from zoo.device import auto_precision

#: Files hashed into a model's identity: every file of the pipeline directory (weights, configs, tokenizer).
_HASH_CHUNK = 1 << 20
_hash_cache: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


class DiffusionModelError(SynthError):
    """A diffusion model that is missing, incomplete or of a kind DiffDFKD cannot drive."""


def _missing_message(model: str, revision: str | None, cause: str) -> str:
    rev = f" (revision {revision})" if revision else ""
    return (f"diffusion model {model!r}{rev}: its weights are not present locally ({cause}). Nothing is downloaded "
            f"unless you ask: provide them by (a) passing a local directory that holds a diffusers pipeline "
            f"(model_index.json + component folders, as pipeline.save_pretrained(DIR) writes), or (b) putting the "
            f"model into the Hugging Face cache on a machine with network access (`hf download {model}"
            f"{' --revision ' + revision if revision else ''}`, then copy ~/.cache/huggingface or set HF_HOME), "
            f"or (c) adding --allow-download where the hub is reachable")


def resolve(model: str, revision: str | None = None, allow_download: bool = False) -> Path:
    """The local directory holding pipeline ``model``: the directory itself, or its hub snapshot in the cache
    (fetched only with ``allow_download``). Raises :class:`DiffusionModelError` when it is not there."""
    if not model:
        raise DiffusionModelError("no diffusion model given: pass --diffusion PATH_OR_HUB_ID")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise DiffusionModelError(f"{path}: not a diffusers pipeline directory (no model_index.json); save one "
                                      "with pipeline.save_pretrained(DIR)")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise DiffusionModelError(_missing_message(model, revision, f"no pipeline directory at {path}"))
    from diffusers import DiffusionPipeline

    try:
        folder = DiffusionPipeline.download(model, revision=revision or None, local_files_only=not allow_download)
    except Exception as error:  # the hub client raises several unrelated types for "not in the cache"
        cause = "not in the Hugging Face cache" if not allow_download else f"download failed: {error}"
        raise DiffusionModelError(_missing_message(model, revision, cause)) from error
    return Path(folder)


def pipeline_sha256(folder: Path) -> str:
    """sha256 over every file of the pipeline (relative path and content), in path order: weights, configs and
    tokenizer together, so a changed scheduler config changes the identity too. Cached per file signature."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                              p.relative_to(folder).parts))
    signature = tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (str(folder.resolve()), signature)
    if key not in _hash_cache:
        total = hashlib.sha256()
        for p in files:
            digest = hashlib.sha256()
            with p.open("rb") as handle:
                while chunk := handle.read(_HASH_CHUNK):
                    digest.update(chunk)
            total.update(f"{p.relative_to(folder).as_posix()}\0{digest.hexdigest()}\n".encode())
        _hash_cache[key] = total.hexdigest()
    return _hash_cache[key]


def describe(folder: Path) -> dict[str, Any]:
    """The pipeline's class, kind (``latent-text``, ``latent-class`` or ``pixel``), whether it is
    class-conditional, and (DiT) its class names -> ids, read from its JSON files alone (no weights loaded).
    Raises :class:`DiffusionModelError` for other kinds."""
    index = json.loads((folder / "model_index.json").read_text())
    refuse_custom_code(folder, index)
    parts = {name for name, value in index.items()
             if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None}
    name = index.get("_class_name")
    labels: dict[str, int] = {}
    if {"transformer", "vae"} <= parts and "text_encoder" not in parts:
        kind, conditional = "latent-class", True
        for key, value in (index.get("id2label") or {}).items():  # DiTPipeline: ImageNet synonyms, comma-separated
            for synonym in str(value).split(","):
                labels.setdefault(synonym.strip().lower(), int(key))
    elif {"unet", "vae", "text_encoder", "tokenizer"} <= parts:
        kind, conditional = "latent-text", False
    elif "unet" in parts and "vae" not in parts:
        kind = "pixel"
        unet = json.loads((folder / "unet" / "config.json").read_text())
        conditional = bool(unet.get("num_class_embeds") or unet.get("class_embed_type"))
    else:
        raise DiffusionModelError(f"{folder}: unsupported pipeline {name} (components {sorted(parts)}): expected a "
                                  "Stable Diffusion family pipeline (UNet + VAE + text encoder + tokenizer), a DiT "
                                  "pipeline (transformer + VAE) or a pixel-space UNet DDPM")
    return {"pipeline": name, "kind": kind, "class_conditional": conditional, "labels": labels}


LIBRARIES = frozenset({"diffusers", "transformers"})


def refuse_custom_code(folder: Path, index: dict[str, Any]) -> None:
    """A pipeline folder (perhaps a stranger's) whose code would run on loading is refused before anything loads:
    a ``.py`` file in it, or a component or pipeline class from a module other than diffusers and transformers
    (what ``from_pretrained`` imports from the folder: 0.42 asks for ``trust_remote_code`` first, older may not)."""
    code = sorted(str(path.relative_to(folder)) for path in folder.rglob("*.py"))
    foreign = sorted(f"{name}: {value[0]}" for name, value in index.items()
                     if isinstance(value, list) and len(value) == 2 and value[0] not in LIBRARIES | {None})
    if isinstance(index.get("_class_name"), list):
        foreign.append(f"_class_name: {index['_class_name']}")
    if code or foreign:
        raise DiffusionModelError(f"{folder}: holds code that loading it would run ({', '.join(code + foreign)}); "
                                  "DiffDFKD loads diffusers and transformers components only")


def identity(model: str, revision: str | None = None, allow_download: bool = False) -> dict[str, Any]:
    """What names a diffusion model in a dataset's identity: the id as given, its revision, its pipeline class
    and kind, and the sha256 of its files. Raises :class:`DiffusionModelError` when it is missing."""
    folder = resolve(model, revision, allow_download)
    described = {k: v for k, v in describe(folder).items() if k != "labels"}
    return {"model": model, "revision": revision or None, **described, "sha256": pipeline_sha256(folder)}


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The weights' dtype. ``auto``: what ``--precision auto`` runs on ``device`` (zoo.Acceleration: bf16 on CUDA
    with bf16, fp16 on older CUDA, bf16 on a CPU with a bf16 fast path, fp32 on other CPUs); fp16 needs CUDA."""
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        precision = auto_precision(device)
    if precision not in table:
        raise DiffusionModelError(f"unknown precision {precision!r}; choose auto, fp32, fp16 or bf16")
    if device.type != "cuda" and precision == "fp16":
        raise DiffusionModelError(f"precision fp16 needs CUDA; on {device.type} use bf16, fp32 or auto")
    return table[precision]


def dtype_keyword() -> str:
    """The ``from_pretrained`` keyword the installed diffusers reads for the weights' dtype: ``dtype`` from 0.40
    on (``torch_dtype`` is deprecated there); before 0.40 only ``torch_dtype``, and ``dtype`` is ignored."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"


@dataclass
class DiffusionModel:
    """The parts of a loaded pipeline that the guided loop drives, frozen, on one device."""

    kind: str  # latent-text | latent-class | pixel
    denoiser: torch.nn.Module
    scheduler: Any
    dtype: torch.dtype
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: Any = None
    class_conditional: bool = False
    null_class: int | None = None  # the unconditional class id of a class-conditional model with CFG (DiT)
    latent_shape: tuple[int, int, int] = (0, 0, 0)  # C, H, W of z at the chosen resolution
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    # -- conditions ------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder embeddings of ``prompts`` (padded to the tokenizer's length, as pipelines do)."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        with torch.no_grad():
            return self.text_encoder(tokens.input_ids.to(self.device))[0]

    # -- one denoiser evaluation ------------------------------------------------------------------------

    def model_output(self, z: torch.Tensor, t: torch.Tensor, condition: dict[str, torch.Tensor],
                     guidance_scale: float) -> torch.Tensor:
        """The denoiser's output at (z_t, t), classifier-free guided (Eq. 3) when there is an unconditional
        input and s != 1: eps(z|0) + s (eps(z|c) - eps(z|0)), both halves in one batched forward pass."""
        z_in = self.scheduler.scale_model_input(z, t).to(self.dtype)
        if self.kind == "latent-text":
            cond, uncond = condition["text"], condition.get("negative")
            if uncond is None or guidance_scale == 1:
                return self.denoiser(z_in, t, encoder_hidden_states=cond).sample.float()
            out = self.denoiser(torch.cat([z_in, z_in]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            out_uncond, out_cond = out.float().chunk(2)
            return out_uncond + guidance_scale * (out_cond - out_uncond)
        channels = z.shape[1]  # a learned-variance model predicts [eps, variance]: keep eps
        if self.kind == "latent-class":
            labels = condition["class_labels"]
            if self.null_class is None or guidance_scale == 1:
                return self.denoiser(z_in, timestep=t.expand(len(z)), class_labels=labels).sample[:, :channels].float()
            null = torch.full_like(labels, self.null_class)
            out = self.denoiser(torch.cat([z_in, z_in]), timestep=t.expand(2 * len(z)),
                                class_labels=torch.cat([labels, null])).sample[:, :channels].float()
            out_cond, out_uncond = out.chunk(2)
            return out_uncond + guidance_scale * (out_cond - out_uncond)
        labels = condition.get("class_labels") if self.class_conditional else None
        return self.denoiser(z_in, t, class_labels=labels).sample[:, :channels].float()

    def predict_x0(self, output: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂0 from the model output (Eq. 4: (z_t - sqrt(1 - a_t) eps) / sqrt(a_t) for an eps model; the
        v- and sample-prediction forms for models trained so)."""
        alpha = self.scheduler.alphas_cumprod.to(z.device)[int(t)].float()
        kind = self.scheduler.config.get("prediction_type", "epsilon")
        if kind == "epsilon":
            return (z - (1 - alpha).sqrt() * output) / alpha.sqrt()
        if kind == "v_prediction":
            return alpha.sqrt() * z - (1 - alpha).sqrt() * output
        if kind == "sample":
            return output
        raise DiffusionModelError(f"unsupported prediction_type {kind!r} in the scheduler config")

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x̂0 as pixels in [0, 1], NCHW (through the VAE decoder for latent models)."""
        if self.vae is not None:
            config = self.vae.config
            latents = x0 / config.scaling_factor + (config.get("shift_factor") or 0.0)
            x0 = self.vae.decode(latents.to(self.dtype)).sample.float()
        return (x0 / 2 + 0.5).clamp(0, 1)


def to_teacher_pixels(images: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """Decoded images resized to the teacher's input (bilinear; antialiased when shrinking) and converted to
    its channel count (grey -> repeated; RGB -> ITU-R 601 luma), differentiably."""
    if images.shape[-2:] != (height, width):
        shrink = images.shape[-2] > height or images.shape[-1] > width
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=shrink)
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return images.expand(-1, channels, -1, -1)
    if have == 3 and channels == 1:
        weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    raise DiffusionModelError(f"cannot map the diffusion model's {have} channels to the teacher's {channels}")


def load(folder: Path, device: torch.device, precision: str = "auto", scheduler: str = "ddim",
         resolution: int = 0) -> DiffusionModel:
    """Loads the pipeline in ``folder`` (see :func:`resolve`) with ``from_pretrained`` and keeps its parts,
    frozen on ``device``. ``scheduler``: ``ddim`` or ``ddpm`` rebuilds that scheduler from the pipeline's
    scheduler config; ``pipeline`` keeps the one it ships. ``resolution``: image side in pixels (0: the model's)."""
    import diffusers

    dtype = pick_dtype(precision, device)
    index = json.loads((folder / "model_index.json").read_text())
    extra = {name: None for name in ("safety_checker", "feature_extractor", "image_encoder") if name in index}
    if "requires_safety_checker" in index:
        extra["requires_safety_checker"] = False
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:  # else diffusers warns that it would load faster with it
        extra["low_cpu_mem_usage"] = False
    diffusers.utils.logging.disable_progress_bar()  # synth shows its own progress
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True,
                                                           **{dtype_keyword(): dtype}, **extra)
    except (OSError, ValueError) as error:
        raise DiffusionModelError(f"{folder}: cannot load the diffusers pipeline: {error}") from error
    components = pipe.components
    described = describe(folder)
    kind, class_conditional = described["kind"], described["class_conditional"]
    denoiser = components["transformer"] if kind == "latent-class" else components["unet"]
    vae, text_encoder, tokenizer = (components.get(k) for k in ("vae", "text_encoder", "tokenizer"))
    sched = components["scheduler"]
    if scheduler in ("ddim", "ddpm"):
        cls = diffusers.DDIMScheduler if scheduler == "ddim" else diffusers.DDPMScheduler
        sched = cls.from_config(sched.config)
    elif scheduler != "pipeline":
        raise DiffusionModelError(f"unknown scheduler {scheduler!r}; choose ddim, ddpm or pipeline")
    if not hasattr(sched, "alphas_cumprod"):
        raise DiffusionModelError(f"scheduler {type(sched).__name__} has no alphas_cumprod, which x0 prediction "
                                  "(Eq. 4) needs; use --scheduler ddim")
    for module in (denoiser, vae, text_encoder):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
            if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
                module.to(dtype)  # a diffusers that ignored the keyword: the inputs are cast to dtype, so must it be
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    native = int(denoiser.config.sample_size) * scale
    side = resolution or native
    if side % scale:
        raise DiffusionModelError(f"resolution {side} is not a multiple of the VAE's downsampling factor {scale}")
    null = denoiser.config.get("num_embeds_ada_norm") if kind == "latent-class" else None
    info = {"kind": kind, "pipeline": index.get("_class_name"), "scheduler": type(sched).__name__,
            "native_resolution": native, "resolution": side, "dtype": str(dtype).removeprefix("torch.")}
    return DiffusionModel(kind, denoiser, sched, dtype, vae, text_encoder, tokenizer, class_conditional, null,
                          (int(denoiser.config.in_channels), side // scale, side // scale), info)

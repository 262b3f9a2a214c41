"""Train a small pixel-space DDPM on an image set from *another* domain than the teacher's, for DiffDFKD's
demonstration, and save it with ``save_pretrained`` so that ``synth run diffdfkd --diffusion DIR`` loads it
through the same ``from_pretrained`` path a user's Stable Diffusion takes.

    python -m pipelines.train_ddpm --images digits --out artifacts/ddpm-digits16            # the demonstration
    python -m pipelines.train_ddpm --images imagefolder:PATH --size 32 --out DIR            # any real image set

``--images digits`` is the UCI "Optical Recognition of Handwritten Digits" set that scikit-learn ships inside
its package (``sklearn.datasets.load_digits``: 1,797 8x8 grey images scanned from forms filled in by 43
writers; nothing is downloaded; needs ``pip install scikit-learn``). For the shipped Fashion-MNIST teacher it is
out of domain: handwritten strokes of ten digits, no garment, shoe or bag, no fabric texture or silhouette;
it shares only the imaging format (grey, centred, dark background), which is the fair like-for-like for a
32x32 grey-content teacher, as the paper's Stable Diffusion shares "photographs" with CIFAR but not its
classes. The DDPM never sees a Fashion-MNIST image or label; only the teacher's guidance during
``synth run diffdfkd`` can steer it towards clothes. Other sets: any ``realdata`` spec (labels are ignored).

The model: a UNet2DModel without attention (three resolutions, widths w, 2w, 2w), the cosine noise schedule
(better than the linear one at small image sizes, Nichol & Dhariwal 2021), epsilon prediction, Adam with an
exponential moving average of the weights (the EMA weights are saved: short runs sample far better from
them). ``training.json`` beside the pipeline records the data source, its size, the settings and the final
loss; a sample grid (``samples.png``, DDIM) shows what the model makes unguided. The directory appears whole:
it is written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from atomicio import write_json_atomic

DIGITS_SOURCE = ("sklearn.datasets.load_digits: UCI ML Optical Recognition of Handwritten Digits (1,797 8x8 grey "
                 "images, 43 writers), shipped inside scikit-learn")


def load_images(spec: str, size: int) -> tuple[torch.Tensor, str]:
    """N x C x size x size floats in [-1, 1] and a sentence naming where they came from."""
    if spec == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise SystemExit("--images digits needs scikit-learn (pip install scikit-learn)") from error
        pixels = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]  # values 0..16
        source = DIGITS_SOURCE
    else:
        import realdata

        dataset = realdata.load(spec, "train", size=size if spec.startswith("imagefolder:") else None,
                                progress=False)
        pixels = torch.from_numpy(np.stack([dataset.image(i) for i in range(len(dataset))])).permute(0, 3, 1, 2)
        pixels = pixels.float() / 255
        source = f"realdata spec {spec!r}, training split ({len(dataset)} images)"
    if pixels.shape[-1] != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=pixels.shape[-1] > size)
    return pixels.clamp(0, 1) * 2 - 1, source


def build(size: int, channels: int, width: int) -> tuple[Any, Any]:
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       block_out_channels=(width, 2 * width, 2 * width), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                       norm_num_groups=min(8, width))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    return unet, scheduler


def train(images: torch.Tensor, unet: Any, scheduler: Any, steps: int, batch_size: int, lr: float,
          ema_decay: float, log_every: int = 200) -> tuple[Any, list[float]]:
    """The DDPM objective (Ho et al. 2020): MSE between the noise and its prediction at a random timestep.
    Returns the EMA model and the mean loss of each logging window."""
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                                 (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses, window = [], []
    unet.train()
    for step in range(steps):
        batch = images[torch.randint(len(images), (batch_size,))]
        noise = torch.randn_like(batch)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,))
        loss = F.mse_loss(unet(scheduler.add_noise(batch, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            losses.append(sum(window) / len(window))
            print(f"step {step + 1}/{steps}  loss {losses[-1]:.4f}", flush=True)
            window = []
    return ema.eval(), losses


@torch.no_grad()
def sample_grid(unet: Any, scheduler: Any, path: Path, count: int = 64, steps: int = 50) -> None:
    from diffusers import DDIMScheduler
    from torchvision.utils import save_image

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    config = unet.config
    x = torch.randn(count, config.in_channels, config.sample_size, config.sample_size)
    for t in ddim.timesteps:
        x = ddim.step(unet(x, t).sample, t, x).prev_sample
    save_image((x / 2 + 0.5).clamp(0, 1), path, nrow=int(math.sqrt(count)))


def save(out: Path, unet: Any, scheduler: Any, record: dict[str, Any], grid: bool) -> None:
    """The pipeline directory, whole or not at all: written as OUT.tmp, then renamed over any old OUT."""
    from diffusers import DDPMPipeline

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
    if grid:
        sample_grid(unet, scheduler, tmp / "samples.png")
    write_json_atomic(tmp / "training.json", record)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="digits",
                        help="'digits' (scikit-learn's bundled handwritten digits) or a realdata spec")
    parser.add_argument("--out", required=True, type=Path, help="pipeline directory to write (save_pretrained)")
    parser.add_argument("--size", type=int, default=16, help="image side the DDPM generates")
    parser.add_argument("--width", type=int, default=32, help="UNet base channel width")
    parser.add_argument("--steps", type=int, default=3000, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-grid", action="store_true", help="skip the samples.png grid")
    args = parser.parse_args(argv)
    if args.size % 4 or args.steps <= 0:
        parser.error("--size must be a multiple of 4 (three UNet resolutions) and --steps positive")
    torch.manual_seed(args.seed)
    images, source = load_images(args.images, args.size)
    unet, scheduler = build(args.size, images.shape[1], args.width)
    print(f"{len(images)} images {tuple(images.shape[1:])} from {source}; "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters", flush=True)
    started = time.perf_counter()
    ema, losses = train(images, unet, scheduler, args.steps, args.batch_size, args.lr, args.ema_decay)
    seconds = time.perf_counter() - started
    record = {"images": args.images, "source": source, "num_images": len(images), "shape": list(images.shape[1:]),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "loss_by_window": [round(v, 5) for v in losses], "train_seconds": round(seconds, 1),
              "command": "python -m pipelines.train_ddpm " + " ".join(sys.argv[1:] if argv is None else argv)}
    save(args.out, ema, scheduler, record, grid=not args.no_grid)
    print(json.dumps({"out": str(args.out), "train_seconds": round(seconds, 1), "final_loss": losses[-1]}))


if __name__ == "__main__":
    main()

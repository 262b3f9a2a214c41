"""``synth condense``: dataset condensation by distribution matching, for a user who *holds real data*.

This is **not** part of the data-free path: it reads a real labelled training set and writes a handful of
images per class that ``synth run METHOD --condensed DIR`` then uses to guide model inversion (and that
``distill train --data imagefolder:DIR`` trains on). It exists so that the condensed-data plug-in can be tried
without another toolkit; any condensation method's output in the accepted layouts works as well.

Distribution Matching (DM; Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023, Eq. 4):

    min_S  E_{theta ~ P_theta, omega ~ Omega}  sum_c || mean_{x in T_c} psi_theta(A(x, omega))
                                                     - mean_{s in S_c} psi_theta(A(s, omega)) ||^2

per class c, the mean embedding of real images T_c and of the synthetic images S_c under a *freshly, randomly
initialised* embedding network psi_theta each iteration (ConvNet-3: conv 3x3, instance norm, ReLU, average
pool, as in DM), with differentiable Siamese augmentation A (one parameter set per class and iteration,
applied to every real and synthetic image alike: :func:`synth.core.augment.diff_augment` with ``params``;
one seed on both sides would share parameters only between the first ``ipc`` images of each side). S starts
from randomly chosen real images of its class (DM's initialisation) and is optimised by SGD (momentum 0.5,
DM's) in pixel space, clamped to [0, 1]. DM's learning rate 1 acts on normalised images; on [0, 1] pixels it
diverges (measured on the toy set of tests/test_condensed_distill.py: the held-out mean-embedding gap grows
12.6 -> 16.6 in 30 iterations), 0.1 closes it (12.6 -> 10.9), so 0.1 is the default (measured before the
augmentation became one parameter set per batch). The paper runs 20,000 iterations with real batches of 256;
the defaults here are a CPU budget (``--iterations`` raises it).

Output: ``OUT/<class index>/<n>.png`` (index zero-padded so that sorted names are class order) and
``OUT/condense.json`` (the configuration, the data spec, class names). Built in a temporary sibling folder,
every file written atomically, and renamed onto ``OUT`` only when complete: a failed or killed run leaves no
``OUT``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from atomicio import TMP_SUFFIX, fsync_dir, write_atomic
from synth.core.augment import diff_augment
from synth.errors import SynthError

from .data import MAX_PER_CLASS


class CondenseError(SynthError):
    """``synth condense`` asked for something the data or the output folder cannot give."""


@dataclass
class CondenseConfig:
    """Distribution-matching settings (DM's, except the CPU-sized iteration count and batch)."""

    ipc: int = field(default=10, metadata={"help": "condensed images per class (1-50)"})
    iterations: int = field(default=200, metadata={
        "help": "DM iterations, each with a freshly initialised embedding network (the paper: 20000)"})
    real_batch: int = field(default=128, metadata={"help": "real images per class per iteration (the paper: 256)"})
    lr: float = field(default=0.1, metadata={
        "help": "SGD learning rate of the condensed pixels in [0, 1] (DM: 1.0 on normalised images)"})
    net_width: int = field(default=128, metadata={"help": "channels of the random ConvNet-3 embedding network"})
    augment: bool = field(default=True, metadata={"help": "Siamese differentiable augmentation on both sides"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, networks and augmentation"})

    def __post_init__(self) -> None:
        if not 1 <= self.ipc <= MAX_PER_CLASS:
            raise CondenseError(f"--ipc must be 1-{MAX_PER_CLASS} (condensed sets hold that many per class), "
                                f"got {self.ipc}")
        if self.iterations < 0 or self.real_batch < 1 or self.net_width < 1 or self.lr <= 0:
            raise CondenseError("--iterations must be >= 0 and --real-batch, --net-width, --lr positive")


def embedding_network(channels: int, width: int, size: int) -> nn.Module:
    """DM's ConvNet-3 without its classifier: (conv 3x3, instance norm, ReLU, avg-pool 2) x 3, flattened."""
    layers: list[nn.Module] = []
    in_channels = channels
    for _ in range(3):
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                   nn.ReLU(inplace=True), nn.AvgPool2d(2)]
        in_channels = width
        size //= 2
        if size < 2:
            break
    return nn.Sequential(*layers, nn.Flatten())


def distribution_matching(images: np.ndarray, labels: np.ndarray, num_classes: int, config: CondenseConfig,
                          device: torch.device, log: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Condensed images (float N×C×H×W in [0, 1], class-major) and labels from real uint8 N×H×W×C images."""
    gen = torch.Generator().manual_seed(config.seed)
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    short = [c for c, idx in enumerate(by_class) if len(idx) < config.ipc]
    if short:
        raise CondenseError(f"class(es) {', '.join(map(str, short))} hold fewer than --ipc {config.ipc} images")
    real = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # uint8, converted per batch

    def pick(c: int, n: int) -> torch.Tensor:
        idx = by_class[c][torch.randperm(len(by_class[c]), generator=gen)[:n].numpy()]
        return real[torch.from_numpy(idx)].float().div(255).to(device)

    syn = torch.cat([pick(c, config.ipc) for c in range(num_classes)]).requires_grad_(True)  # DM: real init
    syn_labels = torch.arange(num_classes).repeat_interleave(config.ipc)
    optimizer = torch.optim.SGD([syn], lr=config.lr, momentum=0.5)
    channels, size = syn.shape[1], syn.shape[2]
    for iteration in range(config.iterations):
        torch.manual_seed(config.seed * 1_000_003 + iteration)  # a new random network per iteration (DM)
        net = embedding_network(channels, config.net_width, size).to(device).requires_grad_(False)
        loss = torch.zeros((), device=device)
        for c in range(num_classes):
            x_real = pick(c, config.real_batch)
            x_syn = syn[c * config.ipc:(c + 1) * config.ipc]
            if config.augment:  # Siamese: one parameter set for the whole real and synthetic batch
                params = torch.rand(1, 7, generator=gen)
                x_real = diff_augment(x_real, params=params)
                x_syn = diff_augment(x_syn, params=params)
            with torch.no_grad():
                real_mean = net(x_real).mean(0)
            loss = loss + (real_mean - net(x_syn).mean(0)).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            syn.clamp_(0, 1)
        if log is not None and (iteration + 1) % max(1, config.iterations // 10) == 0:
            per_class = float(loss.detach()) / num_classes
            log(f"iteration {iteration + 1}/{config.iterations}: DM loss {per_class:.4f} per class")
    return syn.detach().cpu(), syn_labels


def write_condensed(out: Path, images: torch.Tensor, labels: torch.Tensor, info: dict[str, Any]) -> None:
    """``out/<class>/<n>.png`` and ``out/condense.json``, built in a temporary sibling and renamed at the end."""
    from shards.format import encode_png

    width = len(str(int(labels.max()))) if len(labels) else 1
    tmp = out.with_name(out.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)  # a killed earlier run's leftover
    try:
        tmp.mkdir(parents=True)
        pixels = images.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        counts: dict[int, int] = {}
        for image, label in zip(pixels, labels.tolist(), strict=True):
            folder = tmp / f"{label:0{width}d}"
            folder.mkdir(exist_ok=True)
            n = counts.get(label, 0)
            counts[label] = n + 1
            write_atomic(folder / f"{n:03d}.png", encode_png(image))
        write_atomic(tmp / "condense.json", json.dumps(info, indent=2) + "\n")
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def condense(data: str, out: Path, config: CondenseConfig, *, device: str = "auto", size: int | None = None,
             log: Any = None) -> dict[str, Any]:
    """Reads the training split of ``data`` (a realdata spec), condenses it, writes ``out``; returns the info."""
    import realdata
    import zoo

    out = Path(out)
    if out.exists():
        raise CondenseError(f"{out} exists; choose a new --out (condensed sets are written once, whole)")
    try:
        train = realdata.load(data, split="train", size=size).materialize()
    except realdata.DataError as error:
        raise CondenseError(f"--data {data}: {error}") from None
    target = zoo.pick_device(device)
    images, labels = distribution_matching(train.images, train.labels, train.num_classes, config, target, log)
    info = {"method": "distribution matching (Zhao & Bilen, WACV 2023)", "data": data, "split": "train",
            "class_names": train.class_names, "num_classes": train.num_classes,
            "image_shape": list(train.images.shape[1:]), "config": dataclasses.asdict(config)}
    write_condensed(out, images, labels, info)
    return info

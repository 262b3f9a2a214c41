"""Batch sources: where the training loop's batches come from.

Every source yields :class:`Batch` (float [0, 1] NCHW images on the training device, int64 labels and,
for shards, the teacher's stored logits as float32). Images travel as uint8 N×H×W×C until the last moment:
4× less memory and host-to-device traffic, and the layout the shards and :mod:`realdata` already use.

- :class:`TensorSource` — the whole set as one uint8 tensor (on the GPU when it fits there). An epoch is a
  seeded permutation; each batch is one index operation plus :func:`augment_batch` on the device, so no
  Python runs per sample and the GPU is never starved by a loader.
- :class:`LoaderSource` — batches from an iterable that is rebuilt every epoch (WebDataset streaming of
  shards through a ``DataLoader`` with worker processes, :mod:`distill.streaming`, or an image folder too large
  for memory); augmentation still happens on the device, in batch.
- :class:`ResolutionBatches` — several :class:`TensorSource` of different image sizes, one size per batch.

Which source a run gets, and building it, is :mod:`distill.sources`.

Randomness (order, crops, flips) comes from generators seeded with ``(seed, epoch)``, so an epoch is the
same whether it runs straight through or after ``--resume``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distill.distributed import SINGLE, Distributed

#: Pixels of zero padding for the random-crop augmentation (the CIFAR standard: 4 on 32×32).
CROP_PADDING = 4


@dataclass
class Batch:
    """One training batch on the device."""

    images: torch.Tensor  # float32 [0, 1], N×C×H×W (channels_last strides on CUDA)
    labels: torch.Tensor  # int64 [N]
    logits: torch.Tensor | None = None  # float32 [N, classes]: the teacher's stored logits, if any
    condensed: torch.Tensor | None = None  # bool [N]: which samples are condensed images (mixed shard sets)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible 63-bit seed for each (run seed, epoch) pair."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def augment_batch(
    images: torch.Tensor, generator: torch.Generator, padding: int = CROP_PADDING, flip: bool = True
) -> torch.Tensor:
    """Random crop with ``padding`` zero pixels (i.e. a shift of up to ±padding) and horizontal flip.

    ``images`` is uint8 N×H×W×C on any device; one gather does crop and flip for the whole batch (rows and
    columns are offset per sample, out-of-image positions become the zero padding), so the cost is one
    pass over the batch instead of per-sample Python.
    """
    n, h, w, c = images.shape
    dev = images.device
    oy = torch.randint(-padding, padding + 1, (n, 1), generator=generator, device=dev)
    ox = torch.randint(-padding, padding + 1, (n, 1), generator=generator, device=dev)
    rows = torch.arange(h, device=dev).unsqueeze(0) + oy  # n×h source row of each output row
    cols = torch.arange(w, device=dev).unsqueeze(0) + ox  # n×w source column of each output column
    if flip:
        flipped = torch.rand((n, 1), generator=generator, device=dev) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)  # crop, then mirror the crop
    valid = ((rows >= 0) & (rows < h)).unsqueeze(2) & ((cols >= 0) & (cols < w)).unsqueeze(1)  # n×h×w
    # Gather pixels by flat index (index_select is ~2x faster on CPU than 3-D advanced indexing).
    base = torch.arange(n, device=dev).view(n, 1, 1) * (h * w)
    flat = base + rows.clamp(0, h - 1).unsqueeze(2) * w + cols.clamp(0, w - 1).unsqueeze(1)
    out = images.reshape(n * h * w, c).index_select(0, flat.view(-1)).view(n, h, w, c)
    return out.masked_fill_(~valid.unsqueeze(3), 0)


def to_float_nchw(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 N×H×W×C -> float [0, 1] N×C×H×W. The permute of an NHWC tensor already has channels_last
    strides, so on CUDA (channels_last) this is a single conversion pass with no layout copy."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _num_batches(n: int, batch_size: int) -> int:
    # A trailing batch of one sample is dropped: BatchNorm cannot train on it.
    return n // batch_size + (1 if n % batch_size > 1 else 0)


class TensorSource:
    """The whole set in one uint8 N×H×W×C tensor, batched by indexing with a seeded permutation.

    ``device`` is where batches are consumed. The data itself sits on that device when ``on_device`` (the
    default when it is CUDA), otherwise in (pinned, on CUDA) host memory and each batch is copied over.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        logits: torch.Tensor | None = None,
        *,
        batch_size: int,
        device: torch.device,
        augment: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        channels_last: bool | None = None,
        on_device: bool | None = None,
        condensed: torch.Tensor | None = None,
        dist: Distributed = SINGLE,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"TensorSource wants uint8 N×H×W×C images, got {images.dtype} {tuple(images.shape)}")
        self.device = device
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.seed = seed
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        on_device = device.type == "cuda" if on_device is None else on_device
        store = device if on_device else torch.device("cpu")
        self.images = images.to(store)
        self.labels = labels.to(store, torch.int64)
        self.logits = None if logits is None else logits.to(store)  # stays float16 until batched
        self.condensed = None if condensed is None else condensed.to(store, torch.bool)
        if device.type == "cuda" and not on_device:
            # Pinned pages let the per-batch copy run asynchronously.
            self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()
            self.logits = None if self.logits is None else self.logits.pin_memory()
        self.num_samples = int(self.images.shape[0])
        self.dist = dist  # several ranks: each takes its share of every global batch of batch_size × world

    def __len__(self) -> int:
        if self.dist.active:
            return self.dist.steps(self.num_samples, self.batch_size, self.shuffle)
        return _num_batches(self.num_samples, self.batch_size) if self.shuffle else math.ceil(
            self.num_samples / self.batch_size
        )

    def epoch(self, epoch: int) -> Iterator[Batch]:
        seed = epoch_seed(self.seed, epoch)
        store = self.images.device
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=_generator(torch.device("cpu"), seed)).to(store)
        else:
            order = torch.arange(self.num_samples, device=store)
        aug_gen = _generator(self.device, seed + 1 + 7_919 * self.dist.rank) if self.augment else None
        batches = self.dist.split(order, self.batch_size, self.shuffle) if self.dist.active else None
        for step in range(len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size] if batches is None else batches[step]
            # index_select: a plain gather, ~10x faster than advanced indexing on CPU.
            images = self.images.index_select(0, idx).to(self.device, non_blocking=True)
            labels = self.labels.index_select(0, idx).to(self.device, non_blocking=True)
            logits = None
            if self.logits is not None:
                logits = self.logits.index_select(0, idx).to(self.device, non_blocking=True).float()
            condensed = None
            if self.condensed is not None:
                condensed = self.condensed.index_select(0, idx).to(self.device, non_blocking=True)
            if aug_gen is not None:
                images = augment_batch(images, aug_gen)
            yield Batch(to_float_nchw(images, self.channels_last), labels, logits, condensed)


#: One host batch: uint8 N×H×W×C images, int64 labels, float16/32 logits or None (numpy or torch), and
#: optionally a fourth item, bool [N] "is a condensed sample" (mixed synthetic + condensed sets) or None.
HostBatch = tuple[Any, ...]


class LoaderSource:
    """Batches from ``make_iterable(epoch)`` (rebuilt each epoch), moved to the device and augmented there.

    ``steps`` is the number of batches an epoch is expected to hold (for progress bars and the schedule),
    taken from the manifest's counts rather than by opening every shard.
    """

    def __init__(
        self,
        make_iterable: Callable[[int], Iterable[HostBatch]],
        *,
        num_samples: int,
        batch_size: int,
        device: torch.device,
        augment: bool,
        seed: int = 0,
        channels_last: bool | None = None,
        training: bool = True,
    ) -> None:
        self.make_iterable = make_iterable
        self.training = training
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.device = device
        self.augment = augment
        self.seed = seed
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last

    def __len__(self) -> int:
        if self.training:
            return _num_batches(self.num_samples, self.batch_size)
        return math.ceil(self.num_samples / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        seed = epoch_seed(self.seed, epoch)
        aug_gen = _generator(self.device, seed + 1) if self.augment else None
        pin = self.device.type == "cuda"
        for images, labels, logits, *sources in self.make_iterable(epoch):
            if self.training and len(labels) < 2:  # BatchNorm cannot train on a single sample
                continue
            x = _as_tensor(images, pin).to(self.device, non_blocking=True)
            y = _as_tensor(labels, pin).to(self.device, torch.int64, non_blocking=True)
            z = None if logits is None else _as_tensor(logits, pin).to(self.device, non_blocking=True).float()
            condensed = None if not sources or sources[0] is None else _as_tensor(sources[0], pin).to(self.device)
            if aug_gen is not None:
                x = augment_batch(x, aug_gen)
            yield Batch(to_float_nchw(x, self.channels_last), y, z, condensed)


def _as_tensor(value: Any, pin: bool) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    return t.pin_memory() if pin and not t.is_pinned() else t


class ResolutionBatches:
    """One batch source over several :class:`TensorSource`, one per image size (K-Gen's lower and multiple
    resolutions, :mod:`distill.resolutions`): each epoch yields every source's batches, interleaved in a seeded
    random order, so every epoch visits every sample once and no size comes in one block."""

    def __init__(self, sources: list[TensorSource], seed: int = 0, shuffle: bool = True):
        if not sources:
            raise ValueError("ResolutionBatches needs at least one source")
        self.sources = list(sources)
        self.seed = seed
        self.shuffle = shuffle
        self.images = self.sources[0].images  # where the data lives, for reports
        self.num_samples = sum(s.num_samples for s in self.sources)

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        order = torch.cat([torch.full((len(s),), i) for i, s in enumerate(self.sources)])
        if self.shuffle:
            gen = _generator(torch.device("cpu"), epoch_seed(self.seed, epoch) + 2)
            order = order[torch.randperm(len(order), generator=gen)]
        streams = [s.epoch(epoch) for s in self.sources]
        for i in order.tolist():
            yield next(streams[i])



def is_condensed(meta: dict[str, Any]) -> bool:
    """Whether a stored sample is a condensed image (``synth --condensed`` writes ``meta["source"]``)."""
    return meta.get("source") == "condensed"


def default_workers() -> int:
    """Worker processes for decoding: the cores there are, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))

"""Which batch source a run gets, and building it: the one place where ``distill`` turns a dataset into batches.

A shard set is first *chosen for* (:func:`choose_shard_source`, from the manifest alone, before anything is
read): decoded into memory (on the GPU when it fits there) or streamed through WebDataset; batches of one
resolution each or every image resized (:mod:`distill.resolutions`); streamed with resampled shards when
several ranks must take the same number of steps; with the teacher's stored logits or without (a live
teacher); marking condensed samples or not. Then :func:`build_shard_source` builds exactly that choice out of
the source types of :mod:`distill.data` and the stream of :mod:`distill.streaming`. A real dataset
(evaluation, ``distill train``) gets :func:`real_source`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import realdata
import shards
from distill.data import (
    HostBatch,
    LoaderSource,
    ResolutionBatches,
    TensorSource,
    default_workers,
    epoch_seed,
    is_condensed,
)
from distill.distributed import SINGLE, Distributed
from distill.resolutions import ResolutionPlan, plan_resolutions
from distill.streaming import stream_epochs

#: ``--cache auto`` decodes the whole set into memory below this many bytes, streams above it.
MEMORY_CACHE_LIMIT = 4 * 1024**3
#: What a shard set's batches can be.
ShardBatchSource = TensorSource | LoaderSource | ResolutionBatches


@dataclass(frozen=True)
class SourceChoice:
    """How a shard set becomes batches: ``path`` is "memory", "stream" or "resampled" (streamed shards drawn
    with replacement, for several ranks)."""

    path: str
    plan: ResolutionPlan
    on_device: bool  # the decoded set sits on the (CUDA) training device
    with_logits: bool  # batches carry the stored teacher logits (not needed with a live teacher)
    with_sources: bool  # batches say which samples are condensed images
    augment: bool

    def describe(self) -> str:
        """What metrics.json records as ``data_path``."""
        if self.path != "memory":
            return "stream"
        text = "memory" + (" (on GPU)" if self.on_device else "")
        return text + (f", {self.plan.describe()}" if self.plan.mode != "single" else "")


def choose_shard_source(location: str, manifest: dict[str, Any], *, cache: str, device: torch.device,
                        augment: bool, with_logits: bool, with_sources: bool = False, dist: Distributed = SINGLE,
                        plan: ResolutionPlan | None = None) -> SourceChoice:
    """The source for ``manifest``: decoded into memory (``cache`` "memory", or "auto" below
    :data:`MEMORY_CACHE_LIMIT`) or streamed; a ``plan`` that resizes or batches by resolution reads into memory."""
    plan = plan or plan_resolutions(manifest, None)
    n, k = int(manifest["num_samples"]), int(manifest["num_classes"])
    if plan.mode != "single":
        if cache == "stream":
            raise shards.ShardError(f"{location}: {plan.describe()} is read into memory; use --cache memory or auto")
        decoded = sum(h * w * 3 for h, w in plan.sizes) * n
        path = "memory"
    else:
        h, w, c = manifest["schema"]["image"]["shape"]
        decoded = n * (h * w * c + 2 * k + 8)
        path = cache if cache != "auto" else ("memory" if decoded < MEMORY_CACHE_LIMIT else "stream")
        if path == "stream" and dist.active:
            path = "resampled"
    on_device = path == "memory" and device.type == "cuda" and _fits_on_gpu(decoded, device)
    return SourceChoice(path, plan, on_device, with_logits, with_sources, augment)


def build_shard_source(location: str, manifest: dict[str, Any], choice: SourceChoice, *, batch_size: int, seed: int,
                       device: torch.device, workers: int | None, progress: bool, cache_dir: str | None = None,
                       dist: Distributed = SINGLE, offline: bool = False) -> ShardBatchSource:
    """The batches ``choice`` describes (reads or opens the shards)."""
    workers = default_workers() if workers is None else workers
    if choice.path != "memory":
        return stream_source(location, int(manifest["num_samples"]), batch_size=batch_size, device=device,
                             augment=choice.augment, seed=seed, workers=workers, with_logits=choice.with_logits,
                             with_sources=choice.with_sources, cache_dir=cache_dir, dist=dist, offline=offline)

    def tensors(arrays: shards.ShardArrays, split: Distributed) -> TensorSource:
        logits = torch.from_numpy(np.ascontiguousarray(arrays.logits)) if choice.with_logits else None
        return TensorSource(
            torch.from_numpy(np.ascontiguousarray(arrays.images)), torch.from_numpy(arrays.labels), logits,
            batch_size=batch_size, device=device, augment=choice.augment, seed=seed, on_device=choice.on_device,
            condensed=_condensed_flags(arrays) if choice.with_sources else None, dist=split,
        )

    plan = choice.plan
    if plan.mode == "single":
        return tensors(shards.load_arrays(location, workers=workers, progress=progress, cache_dir=cache_dir,
                                           offline=offline), dist)
    # Sets of several sizes train in one process's order (no rank split).
    if plan.mode == "resized":
        size = plan.train_size[0] if plan.train_size else 0
        return tensors(shards.load_arrays(location, workers=workers, progress=progress, resize=size,
                                           cache_dir=cache_dir, offline=offline), SINGLE)
    return ResolutionBatches([tensors(shards.load_arrays(location, workers=workers, progress=progress,
                                                         resolution=size, cache_dir=cache_dir,
                                                         offline=offline), SINGLE) for size in plan.sizes], seed=seed)


def shard_source(location: str, manifest: dict[str, Any], *, cache: str, workers: int | None, batch_size: int,
                 seed: int, device: torch.device, augment: bool, with_logits: bool, progress: bool,
                 with_sources: bool = False, cache_dir: str | None = None, dist: Distributed = SINGLE,
                 plan: ResolutionPlan | None = None, offline: bool = False) -> tuple[ShardBatchSource, str]:
    """Choose and build in one call; returns the source and which path it took (``SourceChoice.describe``)."""
    choice = choose_shard_source(location, manifest, cache=cache, device=device, augment=augment,
                                 with_logits=with_logits, with_sources=with_sources, dist=dist, plan=plan)
    source = build_shard_source(location, manifest, choice, batch_size=batch_size, seed=seed, device=device,
                                workers=workers, progress=progress, cache_dir=cache_dir, dist=dist,
                                offline=offline)
    return source, choice.describe()


def stream_source(location: str, num_samples: int, *, batch_size: int, device: torch.device, augment: bool,
                  seed: int, workers: int, with_logits: bool = True, with_sources: bool = False,
                  cache_dir: str | None = None, dist: Distributed = SINGLE, offline: bool = False) -> LoaderSource:
    """WebDataset streaming of the shards (verified as they stream), batched in ``DataLoader`` workers.

    Each epoch pins the stream's epoch (shard order and shuffle buffer are seeded by ``(seed, epoch)``), so a
    resumed run sees the same order; the epoch ends when every shard was read once (no resampling, so the
    per-worker remainders are regrouped into full batches in the main process).

    With several ranks every rank must take the same number of steps, which a split of whole shards cannot
    promise: each rank (and worker) then draws shards with replacement (seeded by rank, worker and epoch)
    and an epoch is ``num_samples // world // batch_size`` full batches on every rank, from the manifest's count.
    """
    steps = None
    if dist.active:
        steps = num_samples // dist.world // batch_size
        if steps == 0:
            raise shards.ShardError(f"{location}: {num_samples} samples cannot give each of {dist.world} ranks one "
                                    f"batch of {batch_size}; use a smaller --batch-size or --cache memory")
        num_samples = steps * batch_size
    make = stream_epochs(location, batch_size=batch_size, seed=seed, workers=workers, with_logits=with_logits,
                         with_sources=with_sources, cache_dir=cache_dir, steps=steps, offline=offline)
    return LoaderSource(make, num_samples=num_samples, batch_size=batch_size, device=device, augment=augment,
                        seed=seed)


def _condensed_flags(arrays: shards.ShardArrays) -> torch.Tensor:
    """bool [N]: which samples are condensed images."""
    return torch.tensor([is_condensed(m) for m in arrays.meta], dtype=torch.bool)


def _fits_on_gpu(nbytes: int, device: torch.device) -> bool:
    # Keep at least half the free GPU memory for the model, activations and the teacher.
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes < free // 2


# ------------------------------------------------------------------------------------------ real datasets


def real_source(ds: realdata.RealDataset, *, batch_size: int, device: torch.device, augment: bool,
                shuffle: bool, seed: int, workers: int | None,
                dist: Distributed = SINGLE) -> TensorSource | LoaderSource:
    """An in-memory (on-device on CUDA) source for in-memory sets, a DataLoader source for big folders."""
    if ds.in_memory:
        return TensorSource(
            ds.uint8_nhwc(), torch.from_numpy(ds.labels), None, batch_size=batch_size, device=device,
            augment=augment, shuffle=shuffle, seed=seed,
            on_device=device.type == "cuda" and _fits_on_gpu(ds.nbytes, device), dist=dist,
        )
    n_workers = default_workers() if workers is None else workers

    def make(epoch: int) -> Iterator[HostBatch]:
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        loader = torch.utils.data.DataLoader(
            _Uint8View(ds), batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=n_workers,
            collate_fn=_collate_uint8, persistent_workers=False,
        )
        yield from loader

    return LoaderSource(make, num_samples=len(ds), batch_size=batch_size, device=device, augment=augment,
                        seed=seed, training=shuffle)


class _Uint8View(torch.utils.data.Dataset):
    def __init__(self, ds: realdata.RealDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.ds.image(i), int(self.ds.labels[i])


def _collate_uint8(items: list[tuple[np.ndarray, int]]) -> HostBatch:
    return np.stack([x for x, _ in items]), np.asarray([y for _, y in items], dtype=np.int64), None

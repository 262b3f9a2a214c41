"""Where ``distill`` batches come from: real datasets (in memory or through a ``DataLoader``) and shard
datasets (decoded into memory, or streamed and verified as they stream)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

import realdata
import shards
from distill.data import (
    HostBatch,
    LoaderSource,
    ShardBatches,
    TensorSource,
    default_workers,
    epoch_seed,
    identity_collate,
    is_condensed,
    raise_stream_errors,
    rebatch,
)
from distill.distributed import SINGLE, Distributed
from distill.resolutions import ResolutionBatches, ResolutionPlan, load_by_resolution

#: ``--cache auto`` decodes the whole set into memory below this many bytes, streams above it.
MEMORY_CACHE_LIMIT = 4 * 1024**3


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


def _fits_on_gpu(nbytes: int, device: torch.device) -> bool:
    # Keep at least half the free GPU memory for the model, activations and the teacher.
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes < free // 2


def shard_source(location: str, manifest: dict[str, Any], *, cache: str, workers: int | None, batch_size: int,
                 seed: int, device: torch.device, augment: bool, with_logits: bool,
                 progress: bool, with_sources: bool = False,
                 cache_dir: str | None = None, dist: Distributed = SINGLE,
                 plan: ResolutionPlan | None = None) -> tuple[TensorSource | LoaderSource | ResolutionBatches, str]:
    """The shards as batches: decoded into memory (``cache`` "memory", or "auto" below
    :data:`MEMORY_CACHE_LIMIT`) or streamed; returns the source and which path it took. ``with_sources``:
    batches say which samples are condensed images (``meta["source"]``), in memory and streamed. A ``plan`` that
    resizes or batches by resolution (:mod:`distill.resolutions`) reads into memory."""
    if plan is not None and plan.mode != "single":
        return _resolution_source(location, manifest, plan, cache=cache, workers=workers, batch_size=batch_size,
                                  seed=seed, device=device, augment=augment, with_logits=with_logits,
                                  with_sources=with_sources, progress=progress)
    h, w, c = manifest["schema"]["image"]["shape"]
    n = int(manifest["num_samples"])
    k = int(manifest["num_classes"])
    decoded = n * (h * w * c + 2 * k + 8)
    mode = cache
    if mode == "auto":
        mode = "memory" if decoded < MEMORY_CACHE_LIMIT else "stream"
    workers = default_workers() if workers is None else workers
    if mode == "memory":
        arrays = shards.load_arrays(location, workers=workers, progress=progress, cache_dir=cache_dir)
        logits = torch.from_numpy(np.ascontiguousarray(arrays.logits)) if with_logits else None
        source = TensorSource(
            torch.from_numpy(np.ascontiguousarray(arrays.images)), torch.from_numpy(arrays.labels), logits,
            batch_size=batch_size, device=device, augment=augment, seed=seed,
            on_device=device.type == "cuda" and _fits_on_gpu(decoded, device),
            condensed=_condensed_flags(arrays) if with_sources else None, dist=dist,
        )
        return source, "memory" + (" (on GPU)" if source.images.device.type == "cuda" else "")
    return stream_source(location, n, batch_size=batch_size, device=device, augment=augment, seed=seed,
                         workers=workers, with_logits=with_logits, with_sources=with_sources, cache_dir=cache_dir,
                         dist=dist), "stream"


def _condensed_flags(arrays: shards.ShardArrays) -> torch.Tensor:
    """bool [N]: which samples are condensed images."""
    return torch.tensor([is_condensed(m) for m in arrays.meta], dtype=torch.bool)


def _resolution_source(location: str, manifest: dict[str, Any], plan: ResolutionPlan, *, cache: str,
                       workers: int | None, batch_size: int, seed: int, device: torch.device, augment: bool,
                       with_logits: bool, with_sources: bool,
                       progress: bool) -> tuple[TensorSource | ResolutionBatches, str]:
    if cache == "stream":
        raise shards.ShardError(f"{location}: {plan.describe()} is read into memory; use --cache memory or auto")
    workers = default_workers() if workers is None else workers
    decoded = sum(h * w * 3 for h, w in plan.sizes) * int(manifest["num_samples"])
    on_device = device.type == "cuda" and _fits_on_gpu(decoded, device)

    def make(arrays: shards.ShardArrays) -> TensorSource:
        logits = torch.from_numpy(np.ascontiguousarray(arrays.logits)) if with_logits else None
        return TensorSource(torch.from_numpy(np.ascontiguousarray(arrays.images)), torch.from_numpy(arrays.labels),
                            logits, batch_size=batch_size, device=device, augment=augment, seed=seed,
                            on_device=on_device, condensed=_condensed_flags(arrays) if with_sources else None)

    if plan.mode == "resized":
        size = plan.train_size[0] if plan.train_size else 0
        source: TensorSource | ResolutionBatches = make(
            shards.load_arrays(location, workers=workers, progress=progress, resize=size))
    else:
        source = load_by_resolution(location, plan, make, workers=workers, progress=progress, seed=seed)
    return source, "memory" + (" (on GPU)" if source.images.device.type == "cuda" else "") + f", {plan.describe()}"


def stream_source(location: str, num_samples: int, *, batch_size: int, device: torch.device, augment: bool,
                  seed: int, workers: int, with_logits: bool = True, with_sources: bool = False,
                  cache_dir: str | None = None, dist: Distributed = SINGLE) -> LoaderSource:
    """WebDataset streaming of the shards (verified as they stream), batched in ``DataLoader`` workers.

    Each epoch pins the stream's epoch (shard order and shuffle buffer are seeded by ``(seed, epoch)``), so a
    resumed run sees the same order; the epoch ends when every shard was read once (no resampling, so the
    per-worker remainders are regrouped into full batches in the main process).

    With several ranks every rank must take the same number of steps, which a split of whole shards cannot
    promise: each rank (and worker) then draws shards with replacement (seeded by rank, worker and epoch)
    and an epoch is ``num_samples // world // batch_size`` full batches on every rank, from the manifest's count.
    """
    if dist.active:
        return _resampled_source(location, num_samples, batch_size=batch_size, device=device, augment=augment,
                                 seed=seed, workers=workers, with_logits=with_logits, with_sources=with_sources,
                                 cache_dir=cache_dir, dist=dist)
    pipeline = shards.stream(location, shuffle=1000, seed=seed, cache_dir=cache_dir, with_meta=with_sources)

    def make(epoch: int) -> Iterator[HostBatch]:
        pipeline.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            ShardBatches(pipeline, batch_size, with_logits, with_sources), batch_size=None, num_workers=workers,
            collate_fn=identity_collate, persistent_workers=False,
        )
        yield from rebatch(raise_stream_errors(loader), batch_size)

    return LoaderSource(make, num_samples=num_samples, batch_size=batch_size, device=device, augment=augment,
                        seed=seed)


def _resampled_source(location: str, num_samples: int, *, batch_size: int, device: torch.device, augment: bool,
                      seed: int, workers: int, with_logits: bool, with_sources: bool, cache_dir: str | None,
                      dist: Distributed) -> LoaderSource:
    steps = num_samples // dist.world // batch_size
    if steps == 0:
        raise shards.ShardError(f"{location}: {num_samples} samples cannot give each of {dist.world} ranks one batch "
                                f"of {batch_size}; use a smaller --batch-size or --cache memory")
    pipeline = shards.stream(location, shuffle=1000, seed=seed, resampled=True, cache_dir=cache_dir,
                             with_meta=with_sources)

    def make(epoch: int) -> Iterator[HostBatch]:
        pipeline.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            ShardBatches(pipeline, batch_size, with_logits, with_sources), batch_size=None, num_workers=workers,
            collate_fn=identity_collate, persistent_workers=False,
        )
        # The stream never ends: the epoch is the step count, the same on every rank.
        yield from itertools.islice(rebatch(raise_stream_errors(loader), batch_size), steps)

    return LoaderSource(make, num_samples=steps * batch_size, batch_size=batch_size, device=device,
                        augment=augment, seed=seed)

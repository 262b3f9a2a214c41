"""WebDataset shards as host batches: the streaming half of :mod:`distill.sources`.

Shards are split over ``DataLoader`` worker processes by :func:`shards.stream`; each worker stacks its samples
into numpy batches (:class:`ShardBatches`: one pickled array per batch crosses the process boundary, not one per
sample), the main process regroups the per-worker remainders into full batches (:func:`rebatch`) and turns a
worker's error back into the :class:`shards.ShardError` that names the shard (:func:`raise_stream_errors`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

import shards
from distill.data import HostBatch, is_condensed


def stream_epochs(location: str, *, batch_size: int, seed: int, workers: int, with_logits: bool,
                  with_sources: bool, cache_dir: str | None, steps: int | None = None,
                  offline: bool = False) -> Callable[[int], Iterator[HostBatch]]:
    """``make(epoch)`` for a :class:`~distill.data.LoaderSource`: the shards once, in the order and shuffle that
    ``(seed, epoch)`` give; with ``steps``, shards drawn with replacement and the epoch cut at that many batches
    (every rank of a torchrun job then takes the same number of steps)."""
    pipeline = shards.stream(location, shuffle=1000, seed=seed, cache_dir=cache_dir, with_meta=with_sources,
                             offline=offline, **({"resampled": True} if steps is not None else {}))

    def make(epoch: int) -> Iterator[HostBatch]:
        pipeline.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            ShardBatches(pipeline, batch_size, with_logits, with_sources), batch_size=None, num_workers=workers,
            collate_fn=identity_collate, persistent_workers=False,
        )
        batches = rebatch(raise_stream_errors(loader), batch_size)
        # A resampled stream never ends: the epoch is the step count, the same on every rank.
        yield from (batches if steps is None else itertools.islice(batches, steps))

    return make


def rebatch(items: Iterable[HostBatch], batch_size: int) -> Iterator[HostBatch]:
    """Regroup batches of any size (e.g. per-worker remainders) into batches of exactly ``batch_size``
    (the last one smaller). Inputs are numpy arrays; logits may be None throughout."""
    buf: list[HostBatch] = []
    held = 0
    for item in items:
        buf.append(item)
        held += len(item[1])
        while held >= batch_size:
            merged = _concat(buf)
            yield tuple(None if a is None else a[:batch_size] for a in merged)  # type: ignore[misc]
            rest = tuple(None if a is None else a[batch_size:] for a in merged)
            held -= batch_size
            buf = [rest] if held else []  # type: ignore[list-item]
    if held:
        yield _concat(buf)


def _concat(parts: list[HostBatch]) -> HostBatch:
    if len(parts) == 1:
        return parts[0]
    return tuple(None if parts[0][i] is None else np.concatenate([p[i] for p in parts])
                 for i in range(len(parts[0])))


class ShardBatches(torch.utils.data.IterableDataset):
    """Worker-side batching of a :func:`shards.stream` pipeline (which splits shards across workers).

    Batches are stacked in the worker (one pickled array per batch crosses the process boundary, not one
    per sample). A :class:`shards.ShardError` inside a worker would reach the main process as a traceback
    dump; it is instead yielded as ``{"error": message}`` and re-raised by :func:`raise_stream_errors`, so
    the user sees the message naming the shard.
    """

    def __init__(self, stream: Any, batch_size: int, with_logits: bool = True, with_sources: bool = False) -> None:
        super().__init__()
        self.stream = stream  # yields (image, label, logits[, meta]): meta when built with_meta=with_sources
        self.batch_size = batch_size
        self.with_logits = with_logits
        self.with_sources = with_sources

    def __iter__(self) -> Iterator[Any]:
        samples: list[tuple[Any, ...]] = []
        try:
            for sample in self.stream:
                samples.append(sample)
                if len(samples) == self.batch_size:
                    yield self._stack(samples)
                    samples = []
        except shards.ShardError as exc:
            yield {"error": str(exc)}
            return
        if samples:
            yield self._stack(samples)

    def _stack(self, samples: list[tuple[Any, ...]]) -> HostBatch:
        batch = (np.stack([s[0] for s in samples]), np.asarray([s[1] for s in samples], dtype=np.int64),
                 np.stack([s[2] for s in samples]) if self.with_logits else None)
        if self.with_sources:  # which samples are condensed images (synth --condensed), for their own KD term
            batch += (np.asarray([is_condensed(s[3]) for s in samples], dtype=bool),)
        return batch


def identity_collate(item: Any) -> Any:
    """DataLoader ``collate_fn`` that keeps a worker's numpy batch as it is."""
    return item


def raise_stream_errors(items: Iterable[Any]) -> Iterator[HostBatch]:
    """Pass batches through; turn a worker's ``{"error": message}`` back into :class:`shards.ShardError`."""
    for item in items:
        if isinstance(item, dict):
            raise shards.ShardError(item["error"])
        yield item



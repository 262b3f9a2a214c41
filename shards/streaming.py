"""The streaming read path: a WebDataset pipeline over the manifest's shards that verifies as it reads.

Built from WebDataset's own pieces (``DataPipeline``, ``FluidInterface``, ``split_by_node``,
``split_by_worker``) so the result supports ``.batched()``, ``.map()``, ``.with_epoch()`` and works with
``webdataset.WebLoader`` / ``torch.utils.data.DataLoader``. Opening and expanding tars is done here rather
than by ``webdataset.WebDataset`` because its error handler loses track of which shard failed and ``tarfile``
ends a stream silently at a damaged header (see :mod:`shards.tario`); here every shard's sample count, size
and sha256 are checked as it streams, and every failure is a ShardError naming the shard. Kept apart from
:mod:`shards.reader` because importing webdataset imports torch, which ``load_arrays`` worker processes do not need;
the reader imports this module only inside :func:`shards.stream`, and this module imports only the shared
:mod:`shards.locations` and :mod:`shards.decoding`, never the reader.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import webdataset as wds
from webdataset.utils import pytorch_worker_info

from .decoding import decode_fields
from .format import ShardError, sample_key
from .remote import open_shard
from .tario import MeteredReader, group_samples, iter_tar


@dataclass
class _EpochState:
    """Shared by the stages of one stream (and its ``.compose`` copies) so ``set_epoch`` reaches all of them."""

    epoch: int
    iterations: int = 0
    current: int = 0


class _ShardSource:
    """First stage: ``{"url", "entry", "local"}`` per shard, in an order seeded by (seed, epoch)."""

    def __init__(self, urls: list[str], entries: list[dict[str, Any]], local: bool, seed: int,
                 state: _EpochState, shuffle: bool, resampled: bool):
        self.items = [{"url": u, "entry": e, "local": local} for u, e in zip(urls, entries, strict=True)]
        self.seed = seed
        self.state = state
        self.shuffle = shuffle
        self.resampled = resampled

    def __call__(self) -> Iterator[dict[str, Any]]:
        epoch = self.state.current
        if self.resampled:
            # Each rank and worker draws its own shards; seeding by them keeps runs reproducible.
            rank, _world, worker, _workers = pytorch_worker_info()
            return self._resampled(random.Random(f"resample:{self.seed}:{epoch}:{rank}:{worker}"))
        items = list(self.items)
        if self.shuffle:
            # Same permutation on every rank and worker, *before* splitting, so the split is a partition.
            random.Random(f"shards:{self.seed}:{epoch}").shuffle(items)
        return iter(items)

    def _resampled(self, rng: random.Random) -> Iterator[dict[str, Any]]:
        if not self.items:
            return
        while True:
            yield rng.choice(self.items)


def _expand(source: Iterable[dict[str, Any]], checksum: bool, cache_dir: str | None = None) -> Iterator[dict[str, Any]]:
    """Raw sample dicts from each shard; raises ShardError naming the shard on any failure or mismatch."""
    for item in source:
        url, entry = item["url"], item["entry"]
        name = entry["url"]
        try:
            handle = open_shard(url, entry, item["local"], cache_dir)
        except FileNotFoundError:
            raise ShardError(f"shard {name} is missing (expected at {url})") from None
        except ShardError:
            raise
        except Exception as error:  # network and filesystem errors all mean "cannot open"
            raise ShardError(f"shard {name}: cannot open {url} ({error})") from error
        # Never past the declared size, checksum or not: an endless stream is an error, not an endless epoch.
        reader = MeteredReader(handle, name, entry["bytes"], checksum)
        count = 0
        try:
            # iter_tar reads to end of file, so the hash below covers every byte, padding included.
            for sample in group_samples(iter_tar(reader, name), name, url):  # type: ignore[arg-type]
                expected = sample_key(entry["first_index"] + count)
                if sample["__key__"] != expected:  # keys are unique across shards when each is its range
                    raise ShardError(f"shard {name} ({url}): sample {count} has key {sample['__key__']}, the "
                                     f"manifest's first_index {entry['first_index']} makes it {expected}")
                count += 1
                yield sample
        except ShardError:
            raise
        except Exception as error:  # I/O and network errors mid-shard all mean "unreadable"
            raise ShardError(f"shard {name} ({url}): cannot read ({type(error).__name__}: {error})") from error
        finally:
            handle.close()
        # Checked after the last sample: a damaged shard fails its epoch instead of silently shortening it.
        if reader.sha256 is not None and not reader.matches(entry):
            raise ShardError(f"shard {name} ({url}): size/sha256 mismatch, manifest says {entry['bytes']} bytes "
                             f"sha256 {entry['sha256']}, read {reader.size} bytes sha256 "
                             f"{reader.sha256.hexdigest()}; the file is corrupt or was changed")
        if count != entry["num_samples"]:
            raise ShardError(f"shard {name} ({url}): holds {count} samples, the manifest says "
                             f"{entry['num_samples']}; the tar is damaged")


class _SampleShuffle:
    """Shuffle buffer seeded by (seed, epoch, rank, worker): reproducible, unlike an unseeded buffer."""

    def __init__(self, bufsize: int, seed: int, state: _EpochState):
        self.bufsize = bufsize
        self.seed = seed
        self.state = state

    def __call__(self, source: Iterable[Any]) -> Iterator[Any]:
        return self._run(source, self.state.current)

    def _run(self, source: Iterable[Any], epoch: int) -> Iterator[Any]:
        rank, _world, worker, _workers = pytorch_worker_info()
        rng = random.Random(f"samples:{self.seed}:{epoch}:{rank}:{worker}")
        buffer: list[Any] = []
        for sample in source:
            if len(buffer) < self.bufsize:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            buffer[index], sample = sample, buffer[index]
            yield sample
        rng.shuffle(buffer)
        yield from buffer


class _Decode:
    def __init__(self, manifest: dict[str, Any], with_meta: bool = False):
        self.manifest = manifest
        self.with_meta = with_meta

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterator[tuple[Any, ...]]:
        for sample in source:
            image, label, logits, meta = decode_fields(sample, self.manifest, with_meta=self.with_meta)
            yield (image, label, logits, meta or {}) if self.with_meta else (image, label, logits)


class ShardStream(wds.DataPipeline, wds.FluidInterface):
    """What :func:`shards.stream` returns: a ``webdataset`` pipeline (an ``IterableDataset``) of
    ``(image, label, logits)`` tuples (``(image, label, logits, meta)`` with ``with_meta``), plus ``manifest``,
    ``num_samples``, ``num_shards`` and ``set_epoch``."""

    def __init__(self, manifest: dict[str, Any], urls: list[str], entries: list[dict[str, Any]], *, local: bool,
                 shuffle: int, seed: int, epoch: int, resampled: bool, checksum: bool, cache_dir: str | None = None,
                 with_meta: bool = False):
        # ``entries``: the manifest's shard entries, each with the first_index its keys start at.
        super().__init__()
        self.manifest = manifest
        self.num_samples = int(manifest["num_samples"])
        self.num_shards = len(urls)
        self.resampled = resampled
        self._state = _EpochState(epoch=epoch)
        self._warned = False
        self.append(_ShardSource(urls, entries, local, seed, self._state, shuffle > 0, resampled))
        if not resampled:
            self.append(wds.split_by_node)
            self.append(wds.split_by_worker)
        self.append(_Expand(checksum, cache_dir))
        if shuffle > 1:
            self.append(_SampleShuffle(shuffle, seed, self._state))
        self.append(_Decode(manifest, with_meta))

    def set_epoch(self, epoch: int) -> None:
        """Pins the next iteration's epoch (shard order and shuffle seed); later iterations count up from it."""
        self._state.epoch = epoch
        self._state.iterations = 0

    def iterator1(self) -> Iterator[Any]:
        # One pass over the shards; each pass (an epoch, or a repetition under with_epoch) gets its own order.
        _rank, world, _worker, _workers = pytorch_worker_info()
        if world > 1 and not self.resampled and self.num_shards % world and not self._warned:
            self._warned = True
            warnings.warn(f"{self.num_shards} shards split over {world} ranks: ranks get different numbers of "
                          "samples and DDP can hang at the end of an epoch. Use stream(..., resampled=True) "
                          "with .with_epoch(num_samples // world_size) instead.", stacklevel=2)
        self._state.current = self._state.epoch + self._state.iterations
        self._state.iterations += 1
        return super().iterator1()


class _Expand:
    def __init__(self, checksum: bool, cache_dir: str | None = None):
        self.checksum = checksum
        self.cache_dir = cache_dir

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return _expand(source, self.checksum, self.cache_dir)

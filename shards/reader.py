"""Verifying reader: manifest, in-memory arrays, a WebDataset stream (the full ``verify`` is :mod:`shards.verify`).

A dataset location is a local directory, a local ``manifest.json`` path, or a URL to either (see
:mod:`shards.locations`); its manifest is read and checked by :mod:`shards.manifests`.

Reading never trusts the bytes: shards are checked against the manifest's size and sha256 (and never read past
it), sample counts and keys per shard must match, and everything decodes without pickle. Any failure is a
:class:`ShardError` that names the shard (and the sample key where there is one) — never a silent partial epoch.

Two read paths, because the GPU case needs the second: :func:`stream` is a per-sample WebDataset pipeline for
sets too large for memory, :func:`load_arrays` decodes whole shards (in parallel) into contiguous arrays that a
trainer can keep in RAM or on the GPU; a 50k set of 32×32×3 images is ~150 MB.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .decoding import decode_fields
from .format import ShardError, image_shapes, sample_key
from .locations import Location, is_local_location
from .manifests import read_manifest, shard_entries, shard_urls
from .remote import naming_the_shard, read_shard
from .tario import group_samples, iter_tar

if TYPE_CHECKING:
    from .streaming import ShardStream

_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------- checksums


def check_shard(path: Location, entry: dict[str, Any]) -> None:
    """Local shard ``path`` exists and has the manifest ``entry``'s size and sha256; ShardError otherwise."""
    path = Path(path)
    name = entry["url"]
    if not path.is_file():
        raise ShardError(f"shard {name} is missing (expected at {path})")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ShardError(f"shard {name} ({path}): size mismatch, manifest says {entry['bytes']} bytes, "
                         f"found {size}")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != entry["sha256"]:
        raise ShardError(f"shard {name} ({path}): sha256 mismatch, manifest says {entry['sha256']}, "
                         f"found {digest.hexdigest()}; the file is corrupt or was changed")


def _check_bytes(data: bytes, entry: dict[str, Any], where: str) -> None:
    name = entry["url"]
    if len(data) != entry["bytes"]:
        raise ShardError(f"shard {name} ({where}): size mismatch, manifest says {entry['bytes']} bytes, "
                         f"found {len(data)}")
    found = hashlib.sha256(data).hexdigest()
    if found != entry["sha256"]:
        raise ShardError(f"shard {name} ({where}): sha256 mismatch, manifest says {entry['sha256']}, "
                         f"found {found}; the file is corrupt or was changed")


# --------------------------------------------------------------------------------------------- shards


def _tar_samples(data: bytes, name: str) -> Iterator[dict[str, Any]]:
    """Raw sample dicts from a whole in-memory shard (strict: a damaged header is an error, not an early end)."""
    return group_samples(iter_tar(io.BytesIO(data), name), name, name)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 H×W×C image resized to size×size (PIL bilinear; the identity when it already is)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    pil = Image.fromarray(np.ascontiguousarray(image[:, :, 0] if image.shape[2] == 1 else image))
    out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return out[:, :, None] if image.shape[2] == 1 else out


def _select(part: dict[str, Any], resolution: tuple[int, int] | None, resize: int | None) -> dict[str, Any]:
    """Only the samples of size ``resolution`` (H, W), and/or every image resized to ``resize``²."""
    keep = [i for i, image in enumerate(part["images"])
            if resolution is None or tuple(image.shape[:2]) == tuple(resolution)]
    images = [part["images"][i] if resize is None else resize_image(part["images"][i], resize) for i in keep]
    return {"images": images, "labels": part["labels"][keep], "logits": part["logits"][keep],
            "keys": [part["keys"][i] for i in keep], "meta": [part["meta"][i] for i in keep]}


def _decode_shard(data: bytes, entry: dict[str, Any], where: str, manifest: dict[str, Any],
                  verify: bool, select: tuple[tuple[int, int] | None, int | None] | None = None) -> dict[str, Any]:
    """All samples of one shard as arrays; checks checksum (when ``verify``), count and key continuity.
    ``select`` = (resolution, resize) keeps one image size and/or resizes (see :func:`load_arrays`); images of
    several sizes come back as a list."""
    name = entry["url"]
    if verify:
        _check_bytes(data, entry, where)
    images: list[np.ndarray] = []
    labels: list[int] = []
    logits: list[np.ndarray] = []
    keys: list[str] = []
    metas: list[dict[str, Any]] = []
    for sample in _tar_samples(data, name):
        image, label, logit, meta = decode_fields(sample, manifest, with_meta=True)
        images.append(image)
        labels.append(label)
        logits.append(logit)
        keys.append(sample["__key__"])
        metas.append(meta if meta is not None else {})
    if len(keys) != entry["num_samples"]:
        raise ShardError(f"shard {name}: holds {len(keys)} samples, the manifest says {entry['num_samples']}")
    first = entry["first_index"]  # set by the caller from shard_first_indices, recorded or not
    if keys != [sample_key(first + i) for i in range(len(keys))]:
        raise ShardError(f"shard {name}: keys are not the consecutive indices from {first} the manifest gives it")
    shape = manifest["schema"]["image"]["shape"] or [0, 0, 0]
    part: dict[str, Any] = {
        "images": images,
        "labels": np.asarray(labels, dtype=np.int64),
        "logits": np.stack(logits) if logits else np.zeros((0, manifest.get("num_classes") or 0), np.float16),
        "keys": keys,
        "meta": metas,
    }
    if select is not None:
        part = _select(part, *select)
        if select[1] is not None:
            shape = [select[1], select[1], shape[2]]
    images = part["images"]
    if len({image.shape for image in images}) > 1:
        return part  # several sizes: a list of images (verify reads no pixels)
    part["images"] = np.stack(images) if images else np.zeros((0, *shape), np.uint8)
    return part


def _load_shard_task(url: str, local: bool, entry: dict[str, Any], manifest: dict[str, Any],
                     verify: bool, cache_dir: str | None = None,
                     select: tuple[tuple[int, int] | None, int | None] | None = None) -> dict[str, Any]:
    # Top-level so a process pool can pickle it. Reads the whole shard once: hash and decode share the bytes.
    name = entry["url"]
    with naming_the_shard(name, url):
        data = read_shard(url, entry, local, cache_dir)
    return _decode_shard(data, entry, url, manifest, verify, select)


# --------------------------------------------------------------------------------------------- load_arrays


def _start_method() -> str:
    """fork on Linux: children start in milliseconds and do not re-import the caller's ``__main__`` (spawn
    re-runs unguarded script code and cannot start from ``python -`` or a notebook at all). The children only
    read files and run numpy/PIL/zlib, never torch or CUDA, so the usual hazards of forking a process that
    imported torch do not apply. spawn elsewhere (macOS frameworks are not fork-safe; Windows has no fork)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"



@dataclass
class ShardArrays:
    """A whole dataset decoded into memory, in key order."""

    images: np.ndarray  # uint8 N×H×W×C
    labels: np.ndarray  # int64 [N]
    logits: np.ndarray  # float16 [N, num_classes]
    keys: list[str]
    manifest: dict[str, Any]
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.manifest.get("num_classes") or self.logits.shape[1])

    @property
    def class_names(self) -> list[str] | None:
        teacher = self.manifest.get("teacher")
        names = teacher.get("class_names") if isinstance(teacher, dict) else None
        return list(names) if isinstance(names, list) else None


def load_arrays(location: Location, *, workers: int = 0, verify: bool = True, progress: bool = True,
                cache_dir: str | os.PathLike[str] | None = None, resolution: tuple[int, int] | None = None,
                resize: int | None = None, offline: bool = False) -> ShardArrays:
    """Decodes every shard into contiguous arrays (the fast path for datasets that fit in memory).

    ``workers`` > 0 decodes shards in that many processes, one shard per task. With ``verify`` each shard's
    size and sha256 are checked against the manifest (remote shards too: the bytes are in memory anyway).
    Remote shards are read with retries (:mod:`shards.remote`) and, with ``cache_dir``, kept in that cache.
    A set of several image sizes (``schema.image.shapes``) needs ``resolution=(H, W)``, which keeps the samples
    of that size only, or ``resize=N``, which resizes every image to N×N (bilinear; the stored logits stay those
    of the stored image); both work on any set. ``offline`` reads a remote set's manifest from ``cache_dir``
    without asking the server (:func:`read_manifest`).
    """
    cache = None if cache_dir is None else str(cache_dir)
    manifest = read_manifest(location, cache_dir=cache_dir, offline=offline)
    sizes = image_shapes(manifest)
    if len(sizes) > 1 and resolution is None and resize is None:
        counts = ", ".join(f"{k}: {v}" for k, v in (manifest.get("resolution_counts") or {}).items())
        raise ShardError(f"{location} holds images of several sizes ({counts}); load one size with "
                         "resolution=(H, W) or all of them resized with resize=N")
    if resolution is not None or resize is not None:
        return _load_selected(location, manifest, workers, verify, progress, resolution, resize, cache)
    urls = shard_urls(location, manifest)
    local = is_local_location(location)
    entries = shard_entries(manifest)
    total = manifest["num_samples"]
    shape = manifest["schema"]["image"]["shape"] or [0, 0, 0]
    num_classes = manifest.get("num_classes") or 0
    # Filled in place shard by shard: peak memory is the dataset plus one shard, not twice the dataset.
    images = np.empty((total, *shape), dtype=np.uint8)
    labels = np.empty(total, dtype=np.int64)
    logits = np.empty((total, num_classes), dtype=np.float16)
    keys: list[str] = [""] * total
    meta: list[dict[str, Any]] = [{}] * total
    offsets = np.concatenate([[0], np.cumsum([e["num_samples"] for e in entries])]).astype(int).tolist()

    def place(i: int, part: dict[str, Any]) -> None:
        start, stop = offsets[i], offsets[i + 1]
        images[start:stop] = part["images"]
        labels[start:stop] = part["labels"]
        logits[start:stop] = part["logits"]
        keys[start:stop] = part["keys"]
        meta[start:stop] = part["meta"]
        bar.update(stop - start)

    with tqdm(total=total, unit="img", desc="load shards", disable=not progress, dynamic_ncols=True) as bar:
        if workers > 0 and len(entries) > 1:
            context = multiprocessing.get_context(_start_method())
            with ProcessPoolExecutor(max_workers=min(workers, len(entries)), mp_context=context) as pool:
                futures = {pool.submit(_load_shard_task, url, local, entry, manifest, verify, cache): i
                           for i, (url, entry) in enumerate(zip(urls, entries, strict=True))}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        if future.exception() is not None:
                            for other in pending:
                                other.cancel()
                            raise future.exception()  # type: ignore[misc]
                        place(futures[future], future.result())
        else:
            for i, (url, entry) in enumerate(zip(urls, entries, strict=True)):
                place(i, _load_shard_task(url, local, entry, manifest, verify, cache))

    if len(set(keys)) != total:
        raise ShardError(f"{location}: duplicate sample keys across shards")
    return ShardArrays(images=images, labels=labels, logits=logits, keys=keys, manifest=manifest, meta=meta)


def _load_selected(location: Location, manifest: dict[str, Any], workers: int, verify: bool, progress: bool,
                   resolution: tuple[int, int] | None, resize: int | None, cache: str | None) -> ShardArrays:
    """:func:`load_arrays` with a size filter and/or resizing: shard by shard, then concatenated."""
    urls = shard_urls(location, manifest)
    local = is_local_location(location)
    entries = shard_entries(manifest)
    select = (tuple(resolution) if resolution is not None else None, resize)
    parts: list[dict[str, Any]] = [{}] * len(entries)
    with tqdm(total=manifest["num_samples"], unit="img", desc="load shards", disable=not progress,
              dynamic_ncols=True) as bar:
        if workers > 0 and len(entries) > 1:
            context = multiprocessing.get_context(_start_method())
            with ProcessPoolExecutor(max_workers=min(workers, len(entries)), mp_context=context) as pool:
                futures = [pool.submit(_load_shard_task, url, local, entry, manifest, verify, cache, select)
                           for url, entry in zip(urls, entries, strict=True)]
                for i, future in enumerate(futures):
                    parts[i] = future.result()
                    bar.update(entries[i]["num_samples"])
        else:
            for i, (url, entry) in enumerate(zip(urls, entries, strict=True)):
                parts[i] = _load_shard_task(url, local, entry, manifest, verify, cache, select)
                bar.update(entry["num_samples"])
    channels = int((manifest["schema"]["image"]["shape"] or [0, 0, 0])[2])
    if resize is not None:
        empty_shape = (0, resize, resize, channels)
    elif resolution is not None:
        empty_shape = (0, *resolution, channels)
    else:
        empty_shape = (0, 0, 0, channels)
    images = [p["images"] for p in parts if len(p["images"])]
    keys = [key for p in parts for key in p["keys"]]
    if len(set(keys)) != len(keys):
        raise ShardError(f"{location}: duplicate sample keys across shards")
    num_classes = manifest.get("num_classes") or 0
    return ShardArrays(
        images=np.concatenate(images) if images else np.zeros(empty_shape, np.uint8),
        labels=np.concatenate([p["labels"] for p in parts]) if parts else np.zeros(0, np.int64),
        logits=np.concatenate([p["logits"] for p in parts]) if parts else np.zeros((0, num_classes), np.float16),
        keys=keys, manifest=manifest, meta=[m for p in parts for m in p["meta"]])


# --------------------------------------------------------------------------------------------- stream


def stream(location: Location, *, shuffle: int = 1000, seed: int = 0, epoch: int = 0, resampled: bool = False,
           verify_local: bool = True, checksum: bool = True, cache_dir: str | os.PathLike[str] | None = None,
           with_meta: bool = False, offline: bool = False) -> ShardStream:
    """A WebDataset pipeline yielding ``(image uint8 H×W×C, label int, logits float16)`` tuples; with
    ``with_meta``, ``(image, label, logits, meta dict)`` (``{}`` for a sample without metadata).

    - ``shuffle`` > 0 shuffles the shard order (seeded by ``seed`` and the epoch, identical on every rank) and
      samples through a buffer of that many; ``shuffle=0`` streams in key order.
    - Shards are split across ranks (``webdataset.split_by_node``) and DataLoader workers
      (``split_by_worker``). With ``resampled=True`` every rank/worker draws shards with replacement forever:
      bound it with ``.with_epoch(n)`` (the usual pattern for DDP, where every rank must see the same number of
      batches; with DataLoader workers set the epoch on the loader, e.g. ``WebLoader(...).with_epoch(n)``).
      ``.num_samples`` holds the manifest's count for computing ``n``.
    - Iterating again advances the epoch; call ``.set_epoch(e)`` to pin it (as with DistributedSampler; needed
      when DataLoader workers get a fresh copy of the dataset each epoch).
    - ``verify_local`` checks up front that local shards exist with the manifest's sizes. ``checksum`` hashes
      every shard while it streams (local or remote) and raises at its end if size or sha256 differ.
    - Remote shards are read with retries (:mod:`shards.remote`); with ``cache_dir`` each is kept in that
      cache as it streams, so later epochs read it from disk.
    - ``offline`` reads a remote set's manifest from ``cache_dir`` without asking the server.
    Every error raises ShardError naming the shard; per-shard sample counts and keys are checked too, and no
    shard is read past the size its manifest declares.
    """
    from .streaming import ShardStream  # lazy: webdataset imports torch

    manifest = read_manifest(location, cache_dir=cache_dir, offline=offline)
    urls = shard_urls(location, manifest)
    local = is_local_location(location)
    if local and verify_local:
        for url, entry in zip(urls, manifest["shards"], strict=True):
            if not os.path.isfile(url):
                raise ShardError(f"shard {entry['url']} is missing (expected at {url})")
            if os.path.getsize(url) != entry["bytes"]:
                raise ShardError(f"shard {entry['url']} ({url}): size mismatch, manifest says {entry['bytes']} "
                                 f"bytes, found {os.path.getsize(url)}")
    return ShardStream(manifest, urls, shard_entries(manifest), local=local, shuffle=shuffle, seed=seed, epoch=epoch,
                       resampled=resampled, checksum=checksum,
                       cache_dir=None if cache_dir is None else str(cache_dir), with_meta=with_meta)

"""``verify``: everything that is wrong with a dataset, found by reading every byte once, in bounded memory.

Shards are read as streams and decoded one sample at a time (:func:`scan_shard`): memory holds one sample's
pixels and one shard's labels and logits, however large the shards or their images are. :func:`shards.summarize`
and :func:`iter_samples` (``synth inspect``) read the same way.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from .decoding import decode_fields
from .format import MANIFEST_NAME, Problem, ShardError, logit_stats, sample_key
from .locations import Location, is_local_location, manifest_location, read_all
from .manifests import read_manifest, shard_entries, shard_urls
from .remote import naming_the_shard, open_shard
from .tario import MeteredReader, group_samples, iter_tar

_DRAIN = 1 << 20


def scan_shard(url: str, local: bool, entry: dict[str, Any],
               manifest: dict[str, Any]) -> Iterator[tuple[str, np.ndarray, int, np.ndarray, dict[str, Any]]]:
    """(key, image, label, logits, meta) of every sample of one shard, decoded one at a time from a stream.

    ``entry`` is a :func:`shards.manifests.shard_entries` entry (its ``first_index`` set). Raises ShardError naming
    the shard for a missing or unreadable file, bytes beyond the declared size, damaged tar, a sample that does
    not decode, keys that are not the consecutive indices from ``first_index``, a wrong sample count, and last a
    size or sha256 mismatch (reported in preference to a decode failure it explains).
    """
    name = entry["url"]
    with naming_the_shard(name, url):
        handle = open_shard(url, entry, local)
    reader = MeteredReader(handle, name, entry["bytes"])
    count, failure = 0, None
    try:
        for sample in group_samples(iter_tar(reader, name), name, url):  # type: ignore[arg-type]
            expected = sample_key(entry["first_index"] + count)
            if sample["__key__"] != expected:
                raise ShardError(f"shard {name}: sample {count} has key {sample['__key__']}, the manifest's "
                                 f"first_index {entry['first_index']} makes it {expected}")
            image, label, logits, meta = decode_fields(sample, manifest, with_meta=True)
            count += 1
            yield sample["__key__"], image, label, logits, meta or {}
        if count != entry["num_samples"]:
            raise ShardError(f"shard {name}: holds {count} samples, the manifest says {entry['num_samples']}")
    except ShardError as error:
        failure = error
        try:
            while reader.read(_DRAIN):  # finish the checksum: a changed file explains a failure best
                pass
        except (ShardError, OSError):
            pass
    except OSError as error:
        failure = ShardError(f"shard {name} ({url}): cannot read ({error})")
    finally:
        handle.close()
    if reader.size <= entry["bytes"] and not reader.matches(entry):
        raise ShardError(f"shard {name} ({url}): size or sha256 mismatch, the manifest says {entry['bytes']} bytes "
                         f"sha256 {entry['sha256']}, read {reader.size} bytes sha256 {reader.sha256.hexdigest()}; "
                         "the file is corrupt or was changed") from failure
    if failure is not None:
        raise failure


def iter_samples(location: Location, manifest: dict[str, Any] | None = None
                 ) -> Iterator[tuple[str, np.ndarray, int, np.ndarray, dict[str, Any]]]:
    """(key, image uint8 H×W×C, label, logits float16, meta) of every sample in key order, decoded one at a time
    with every check of :func:`scan_shard`: the way to look at a whole dataset in memory that does not grow with
    it (``synth inspect``). A failure raises ShardError naming the shard."""
    manifest = read_manifest(location) if manifest is None else manifest
    local = is_local_location(location)
    for url, entry in zip(shard_urls(location, manifest), shard_entries(manifest), strict=True):
        yield from scan_shard(url, local, entry, manifest)


def verify(location: Location) -> list[Problem]:
    """Everything that is wrong with the dataset at ``location``; an empty list means healthy.

    Checks the manifest, then every shard: present, size and sha256, a well-formed tar, every sample decodes,
    per-shard counts and keys; then total and per-class counts, the summary's agreement and entropy, and the
    artifacts' sizes and checksums.
    """
    try:
        manifest = read_manifest(location)
    except ShardError as error:
        return [Problem(MANIFEST_NAME, str(error))]
    problems: list[Problem] = []
    local = is_local_location(location)
    num_classes = manifest.get("num_classes") or 0
    counts = np.zeros(num_classes, dtype=np.int64)
    decoded = agree = 0
    entropy = 0.0
    all_read = True
    for url, entry in zip(shard_urls(location, manifest), shard_entries(manifest), strict=True):
        labels, logits = [], []
        try:
            for _key, _image, label, logit, _meta in scan_shard(url, local, entry, manifest):
                labels.append(label)
                logits.append(logit)
        except ShardError as error:
            problems.append(Problem(entry["url"], str(error)))
            all_read = False
            continue
        decoded += len(labels)
        label_array = np.asarray(labels, dtype=np.int64)
        if num_classes:
            counts += np.bincount(label_array, minlength=num_classes)[:num_classes]
        a, e = logit_stats(label_array, np.stack(logits) if logits else np.zeros((0, num_classes)))
        agree += a
        entropy += e
        if "agreement_count" in entry and entry["agreement_count"] != a:
            problems.append(Problem(entry["url"], f"agreement_count {entry['agreement_count']} recorded, "
                                                  f"{a} recomputed"))
    if all_read:
        problems += _manifest_figures(manifest, decoded, counts, agree, entropy)
    problems += _artifact_problems(location, manifest, local)
    return problems


def _manifest_figures(manifest: dict[str, Any], decoded: int, counts: np.ndarray, agree: int,
                      entropy: float) -> list[Problem]:
    problems = []
    if decoded != manifest["num_samples"]:
        problems.append(Problem(MANIFEST_NAME, f"num_samples is {manifest['num_samples']}, shards hold {decoded}"))
    if decoded and counts.tolist() != manifest["class_counts"]:
        problems.append(Problem(MANIFEST_NAME, f"class_counts {manifest['class_counts']} disagree with the "
                                               f"shards' {counts.tolist()}"))
    summary = manifest["summary"]
    if decoded:
        for figure, value in (("teacher_agreement", agree / decoded), ("mean_entropy", entropy / decoded)):
            recorded = summary.get(figure)
            if not isinstance(recorded, (int, float)) or abs(recorded - value) > 1e-6 * max(1.0, abs(value)):
                problems.append(Problem(MANIFEST_NAME, f"summary.{figure} is {recorded}, the shards give {value}"))
    return problems


def _artifact_problems(location: Location, manifest: dict[str, Any], local: bool) -> list[Problem]:
    problems = []
    _where, base, _local = manifest_location(location)
    for name, entry in (manifest.get("artifacts") or {}).items():
        url = os.path.join(base, entry["url"]) if local else f"{base}/{entry['url']}"
        try:
            data = read_all(url, local, int(entry["bytes"]))
        except (OSError, ShardError) as error:
            problems.append(Problem(entry["url"], f"artifact {name!r} cannot be read: {error}"))
            continue
        if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            problems.append(Problem(entry["url"], f"artifact {name!r}: size or sha256 differs from the manifest"))
    return problems

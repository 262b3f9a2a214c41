"""What one stored sample is (:class:`Sample`) and the checks every sample passes before a shard is written.

The writer's first step (:meth:`shards.ShardWriter.commit_shard`): nothing touches the disk before every sample of
a shard has passed, so a bad sample never leaves half a shard behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .format import MAX_IMAGE_PIXELS, ShardError, canonical_json, sample_key


@dataclass
class Sample:
    """One stored sample. ``key`` is the zero-padded global index (``"%09d" % index``)."""

    key: str
    image: np.ndarray  # uint8 H×W×C, C = 1 or 3: exactly the pixels the teacher saw
    label: int  # the class the generator was asked for
    logits: np.ndarray  # the teacher's logits on ``image``, [num_classes]; stored as float16
    meta: dict[str, Any] = field(default_factory=dict)


def check_samples(samples: list[Sample], manifest: dict[str, Any], *, shard_size: int, target_samples: int,
                  num_committed: int, key_offset: int,
                  mixed_sizes: bool) -> tuple[list[Sample], list[int] | None, int | None]:
    """Checked, normalised copies of ``samples`` (float16 logits, resolution in meta), the image shape and
    class count they fix, for the next shard of the dataset ``manifest``; raises ShardError."""
    if not isinstance(samples, (list, tuple)) or not samples:
        raise ShardError("commit_shard needs a non-empty list of Sample")
    if len(samples) > shard_size:
        raise ShardError(f"{len(samples)} samples exceed shard_size {shard_size}")
    if num_committed + len(samples) > target_samples:
        raise ShardError(f"{len(samples)} more samples would exceed target_samples {target_samples} "
                         f"({num_committed} already stored)")
    shape = manifest["schema"]["image"]["shape"]
    num_classes = manifest.get("num_classes")
    checked: list[Sample] = []
    for i, sample in enumerate(samples):
        expected_key = sample_key(key_offset + num_committed + i)
        where = f"sample {i} of the shard (key {getattr(sample, 'key', '?')!r})"
        if not isinstance(sample, Sample):
            raise ShardError(f"{where}: expected shards.Sample, got {type(sample).__name__}")
        if sample.key != expected_key:
            raise ShardError(f"{where}: key must be the next global index {expected_key!r}; keys continue "
                             f"from the {num_committed} samples already stored")
        image = sample.image
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
                or image.shape[2] not in (1, 3):
            desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ShardError(f"{where}: image must be a uint8 H×W×C array with C 1 or 3, got {desc}")
        if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
            raise ShardError(f"{where}: a {image.shape[0]}×{image.shape[1]} image exceeds the {MAX_IMAGE_PIXELS} "
                             "pixels per image this format allows")
        if shape is None:
            shape = list(image.shape)
        elif list(image.shape) != shape and not (mixed_sizes and image.shape[2] == shape[2]):
            raise ShardError(f"{where}: image shape {list(image.shape)} differs from the dataset's {shape}"
                             + ("" if mixed_sizes else " (a set of several sizes needs mixed_sizes=True)"))
        logits = sample.logits
        if not isinstance(logits, np.ndarray) or logits.ndim != 1 or not np.issubdtype(logits.dtype,
                                                                                        np.floating):
            desc = f"{logits.dtype} {logits.shape}" if isinstance(logits, np.ndarray) else type(logits).__name__
            raise ShardError(f"{where}: logits must be a 1-D float array, got {desc}")
        if num_classes is None:
            num_classes = int(logits.shape[0])
        elif logits.shape[0] != num_classes:
            raise ShardError(f"{where}: {logits.shape[0]} logits, the dataset has {num_classes} classes")
        # Stored as float16 (the format's dtype); non-finite after the cast means overflow (|x| > 65504).
        with np.errstate(over="ignore"):  # overflow is reported below, as a ShardError
            logits16 = logits.astype("<f2")
        if not np.isfinite(logits16).all():
            raise ShardError(f"{where}: logits are not finite as float16 (NaN, inf or beyond ±65504)")
        label = sample.label
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)) \
                or not 0 <= int(label) < num_classes:
            raise ShardError(f"{where}: label must be an int in [0, {num_classes}), got {label!r}")
        if not isinstance(sample.meta, dict):
            raise ShardError(f"{where}: meta must be a dict")
        meta = canonical_json(sample.meta, f"{where}: meta")
        meta.setdefault("resolution", [int(image.shape[0]), int(image.shape[1])])
        checked.append(Sample(sample.key, np.ascontiguousarray(image), int(label), logits16, meta))
    return checked, shape, num_classes

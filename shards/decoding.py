"""Decoding one raw sample (a WebDataset dict of bytes per extension) into arrays, without pickle.

Shared by :mod:`shards.reader` and :mod:`shards.streaming`; imports neither (and no torch).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .format import (
    IMAGE_EXT,
    LABEL_EXT,
    LOGITS_EXT,
    META_EXT,
    SAMPLE_EXTS,
    ShardError,
    decode_logits,
    decode_png,
    image_shapes,
)


def shard_label(url: Any) -> str:
    text = str(url or "?")
    return text.rstrip("/").rsplit("/", 1)[-1]


def decode_fields(sample: dict[str, Any], manifest: dict[str, Any] | None,
                  with_meta: bool) -> tuple[np.ndarray, int, np.ndarray, dict[str, Any] | None]:
    """(image, label, logits, meta or None) of ``sample``; ShardError naming the shard and key on any failure."""
    key = sample.get("__key__", "?")
    shard = shard_label(sample.get("__url__"))
    try:
        missing = [ext for ext in (IMAGE_EXT, LABEL_EXT, LOGITS_EXT) if ext not in sample]
        if missing:
            raise ValueError(f"lacks {', '.join('.' + m for m in missing)}")
        unknown = sorted(ext for ext in sample if not ext.startswith("__") and ext not in SAMPLE_EXTS)
        if unknown:  # nothing outside the format travels with a sample (a merge would copy it on)
            raise ValueError(f"holds members this format does not have: {', '.join('.' + u for u in unknown)}")
        num_classes = manifest.get("num_classes") if manifest else None
        shapes = image_shapes(manifest) if manifest else []
        image = decode_png(sample[IMAGE_EXT], shapes[0] if len(shapes) == 1 else None, shapes)
        label = int(bytes(sample[LABEL_EXT]).decode("ascii").strip())
        logits = decode_logits(sample[LOGITS_EXT], num_classes)
        if not isinstance(logits, np.ndarray) or logits.dtype != np.float16 or logits.ndim != 1:
            raise ValueError(f"logits must be a 1-D float16 .npy, got {getattr(logits, 'dtype', type(logits))} "
                             f"{getattr(logits, 'shape', '')}")
        if num_classes is not None and logits.shape[0] != num_classes:
            raise ValueError(f"{logits.shape[0]} logits, the manifest says {num_classes} classes")
        if not 0 <= label < logits.shape[0]:
            raise ValueError(f"label {label} outside [0, {logits.shape[0]})")
        meta = None
        if with_meta and META_EXT in sample:
            meta = json.loads(bytes(sample[META_EXT]).decode("utf-8"))
    except Exception as error:  # every decode failure means "this sample is corrupt"
        raise ShardError(f"shard {shard}: sample {key} does not decode ({type(error).__name__}: {error})") from error
    return image, label, logits, meta


def decode_sample(sample: dict[str, Any], manifest: dict[str, Any] | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """(uint8 H×W×C image, label, float16 logits) from a raw WebDataset sample dict (bytes per extension).

    No pickle is involved. With ``manifest``, shapes are checked against its schema. A failure raises
    ShardError naming the shard (from ``__url__``) and the key.
    """
    image, label, logits, _meta = decode_fields(sample, manifest, with_meta=False)
    return image, label, logits

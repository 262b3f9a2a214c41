"""Looking at a dataset: summary figures from the stored logits and a PNG grid of samples per class.

Used by ``synth inspect``; everything is recomputed from the shards (not copied from the manifest), so the
figures describe what a student will actually be trained on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .format import logit_stats
from .locations import Location, is_local_location
from .manifests import read_manifest, shard_entries, shard_urls
from .reader import ShardArrays
from .verify import scan_shard


def summarize(source: Location | ShardArrays, *, workers: int = 0) -> dict[str, Any]:
    """Per-class counts, teacher agreement and mean softmax entropy (nats) of the stored logits, per class too.

    ``source`` is a dataset location, read shard by shard and one sample at a time (no image is kept, so memory
    does not grow with the images), or arrays already loaded with :func:`shards.load_arrays`. ``workers`` is
    accepted for compatibility and unused.
    """
    if isinstance(source, ShardArrays):
        manifest, labels, logits = source.manifest, source.labels, source.logits
        sources, image_shape = _source_counts(source.meta), list(source.images.shape[1:])
    else:
        manifest, labels, logits, sources = _labels_and_logits(source)
        image_shape = manifest["schema"]["image"]["shape"] or [0, 0, 0]
    num_classes = int(manifest.get("num_classes") or logits.shape[1])
    n = len(labels)
    agree, entropy = logit_stats(labels, logits)
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        count = int(mask.sum())
        a, e = logit_stats(labels[mask], logits[mask])
        per_class.append({"class": c, "count": count,
                          "teacher_agreement": a / count if count else None,
                          "mean_entropy": e / count if count else None})
    teacher = manifest.get("teacher") or {}
    names = teacher.get("class_names") if isinstance(teacher.get("class_names"), list) else None
    if names and len(names) == num_classes:
        for row, name in zip(per_class, names, strict=True):
            row["name"] = name
    total_bytes = sum(int(e["bytes"]) for e in manifest["shards"])
    return {
        "num_samples": n,
        "num_classes": num_classes,
        "image_shape": image_shape,
        "num_shards": len(manifest["shards"]),
        "complete": manifest["complete"],
        "target_samples": manifest["target_samples"],
        "class_counts": np.bincount(labels, minlength=num_classes).tolist(),
        "teacher_agreement": agree / n if n else None,
        "mean_entropy": entropy / n if n else None,
        "bytes_per_sample": total_bytes / n if n else None,
        "sources": sources,
        "per_class": per_class,
    }


def _source_counts(metas: Iterable[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for meta in metas:
        label = str(meta.get("source", "unknown")) if isinstance(meta, dict) else "unknown"
        counts[label] = counts.get(label, 0) + 1
    return counts


def _labels_and_logits(location: Location) -> tuple[dict[str, Any], np.ndarray, np.ndarray, dict[str, int]]:
    """(manifest, labels, logits, samples per meta source) of every sample, streamed: no image is kept."""
    manifest = read_manifest(location)
    local = is_local_location(location)
    labels, logits, sources = [], [], {}
    for url, entry in zip(shard_urls(location, manifest), shard_entries(manifest), strict=True):
        shard_metas = []
        for _key, _image, label, logit, meta in scan_shard(url, local, entry, manifest):
            labels.append(label)
            logits.append(logit)
            shard_metas.append(meta)
        for name, count in _source_counts(shard_metas).items():
            sources[name] = sources.get(name, 0) + count
    num_classes = int(manifest.get("num_classes") or 0)
    return (manifest, np.asarray(labels, dtype=np.int64),
            np.stack(logits) if logits else np.zeros((0, num_classes), np.float16), sources)


def sample_grid_png(arrays: ShardArrays, path: str | os.PathLike[str], class_names: list[str] | None = None,
                    per_class: int = 8, tile: int = 64) -> Path:
    """Writes a PNG with one row per class: the class name, then its first ``per_class`` samples (key order).

    Tiles are scaled up to ``tile`` pixels (nearest neighbour, so pixels stay honest); empty cells stay grey.
    """
    num_classes = arrays.num_classes
    names = class_names or arrays.class_names or [str(c) for c in range(num_classes)]
    font = ImageFont.load_default()
    label_width = 8 + max(int(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(str(n), font=font)) for n in names)
    gap = 2
    width = label_width + per_class * (tile + gap) + gap
    height = num_classes * (tile + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c in range(num_classes):
        top = gap + c * (tile + gap)
        draw.text((4, top + tile // 2 - 6), str(names[c]) if c < len(names) else str(c), fill=(0, 0, 0), font=font)
        indices = np.flatnonzero(arrays.labels == c)[:per_class]
        for j in range(per_class):
            left = label_width + gap + j * (tile + gap)
            if j >= len(indices):
                draw.rectangle([left, top, left + tile - 1, top + tile - 1], fill=(200, 200, 200))
                continue
            image = arrays.images[indices[j]]
            pil = Image.fromarray(np.ascontiguousarray(image[:, :, 0] if image.shape[2] == 1 else image))
            canvas.paste(pil.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (left, top))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out

"""Looking at a dataset: summary figures from the stored logits and a PNG grid of samples per class.

Used by ``synth inspect``; everything is recomputed from the shards (not copied from the manifest), so the
figures describe what a student will actually be trained on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .format import logit_stats
from .reader import Location, ShardArrays, load_arrays


def summarize(source: Location | ShardArrays, *, workers: int = 0) -> dict[str, Any]:
    """Per-class counts, teacher agreement and mean softmax entropy (nats) of the stored logits, per class too.

    ``source`` is a dataset location or arrays already loaded with :func:`shards.load_arrays`.
    """
    arrays = source if isinstance(source, ShardArrays) else load_arrays(source, workers=workers, progress=False)
    manifest = arrays.manifest
    num_classes = arrays.num_classes
    n = len(arrays)
    agree, entropy = logit_stats(arrays.labels, arrays.logits)
    per_class = []
    for c in range(num_classes):
        mask = arrays.labels == c
        count = int(mask.sum())
        a, e = logit_stats(arrays.labels[mask], arrays.logits[mask])
        per_class.append({"class": c, "count": count,
                          "teacher_agreement": a / count if count else None,
                          "mean_entropy": e / count if count else None})
    names = arrays.class_names
    if names and len(names) == num_classes:
        for row, name in zip(per_class, names, strict=True):
            row["name"] = name
    total_bytes = sum(int(e["bytes"]) for e in manifest["shards"])
    sources: dict[str, int] = {}
    for meta in arrays.meta:
        label = str(meta.get("source", "unknown")) if isinstance(meta, dict) else "unknown"
        sources[label] = sources.get(label, 0) + 1
    return {
        "num_samples": n,
        "num_classes": num_classes,
        "image_shape": list(arrays.images.shape[1:]),
        "num_shards": len(manifest["shards"]),
        "complete": manifest["complete"],
        "target_samples": manifest["target_samples"],
        "class_counts": np.bincount(arrays.labels, minlength=num_classes).tolist(),
        "teacher_agreement": agree / n if n else None,
        "mean_entropy": entropy / n if n else None,
        "bytes_per_sample": total_bytes / n if n else None,
        "sources": sources,
        "per_class": per_class,
    }


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

"""Shard sets whose images are not all at the student's input size (K-Gen's lower and multiple resolutions).

Two ways to train from them, and ``distill run`` reports which it took:

- **by resolution** (the default): every batch holds images of one size, the student (globally pooled, as the
  zoo's CNNs are) sees them at that size, and evaluation runs at the size of the evaluation data - how K-Gen
  trains (papers/k-gen.txt, Sec. 3.4-3.6). :class:`distill.data.ResolutionBatches` interleaves the sizes'
  batches in a seeded random order each epoch, so every epoch visits every sample once and no size comes in
  one block.
- **resized** (``--resize N``): every image resized to N×N when loaded (bilinear); the stored logits stay those
  of the stored image.

This module reads the plan off the manifest (:func:`plan_resolutions`); :mod:`distill.sources` builds the batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import shards


@dataclass(frozen=True)
class ResolutionPlan:
    """How a shard set's sizes meet the student: ``mode`` is "single", "by-resolution" or "resized"."""

    mode: str
    sizes: tuple[tuple[int, int], ...]  # stored sizes (H, W)
    train_size: tuple[int, int] | None  # the one size training sees ("single", "resized"), else None
    counts: dict[str, int]

    def describe(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in self.counts.items())
        if self.mode == "resized":
            return f"every image resized to {self.train_size[0]}x{self.train_size[1]} (stored: {counts})"
        if self.mode == "by-resolution":
            return f"batches by resolution ({counts})"
        return f"one resolution ({counts})"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "counts": self.counts,
                "train_size": list(self.train_size) if self.train_size else None}


def plan_resolutions(manifest: dict[str, Any], resize: int | None) -> ResolutionPlan:
    """The plan for ``manifest``: resized when ``resize`` is given, by resolution for several sizes."""
    sizes = tuple(sorted({(int(h), int(w)) for h, w, _ in shards.image_shapes(manifest)}))
    counts = dict(manifest.get("resolution_counts") or
                  {shards.size_key(*sizes[0]): int(manifest["num_samples"])} if sizes else {})
    if resize is not None:
        if resize < 1:
            raise ValueError(f"--resize must be positive, got {resize}")
        return ResolutionPlan("resized", sizes, (resize, resize), counts)
    if len(sizes) > 1:
        return ResolutionPlan("by-resolution", sizes, None, counts)
    return ResolutionPlan("single", sizes, sizes[0] if sizes else None, counts)

"""Helpers of the tests that drive a synthesis method in-process, as the inversion loop drives it: a method built
with a seed and advanced by some stored batches, and the first forward step of its next batch."""

from __future__ import annotations

from typing import Any

import torch
from conftest import NoArtifacts


def built(method_class: type, config: Any, teacher: Any, *, batches: int = 0, prepare: bool = False) -> Any:
    """``method_class(teacher, config)`` on the CPU, seeded with 0, its stage 1 run first when ``prepare`` (with no
    dataset behind it), after ``batches`` stored batches (its proxy student has learnt from them)."""
    torch.manual_seed(0)
    method = method_class(teacher, config, torch.device("cpu"))
    if prepare:
        method.prepare(NoArtifacts())
    stream = method.synthesize()
    for _ in range(batches):
        next(stream)
    return method


def first_step(method: Any, needs_student: bool | None = None) -> tuple[dict, Any]:
    """Begins the next batch and runs its first forward step as ``invert_batch`` does: ``(groups, step)``.
    ``needs_student`` defaults to the loop's choice, ``method.wants_adversarial()``."""
    labels = method.next_labels()
    groups = method.begin_batch(labels)
    method.engine.reset()
    images = method.generate(method.latents, labels)
    if needs_student is None:
        needs_student = method.wants_adversarial()
    return groups, method.forward_step(0, labels, images, needs_student=needs_student)

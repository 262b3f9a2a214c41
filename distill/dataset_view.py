"""Step 2 of ``distill run`` (:mod:`distill.runs`): the dataset as the student will meet it - the manifest,
checked, the sizes the student trains and is evaluated at (:mod:`distill.resolutions`), its class names, whether
it holds condensed samples, and the evaluation data that goes with it."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import realdata
import shards
from distill.core import DistillError
from distill.resolutions import ResolutionPlan, plan_resolutions


@dataclass
class DatasetView:
    """Step 2's answer: the dataset as the student will meet it."""

    manifest: dict[str, Any]
    plan: ResolutionPlan
    shape: tuple[int, int, int]  # (C, H, W) the student is evaluated at and its card records
    stored_shapes: list[tuple[int, int, int]]  # (C, H, W) the student trains at
    num_classes: int
    class_names: list[str]
    teacher_info: dict[str, Any]
    where: str
    condensed_counts: dict[str, Any]  # source_counts of a set with condensed samples, else {}


def read_dataset(location: str, *, resize: int | None, cache_dir: str | None, offline: bool = False) -> DatasetView:
    """The manifest, checked; sizes other than the teacher's (K-Gen) train by resolution or ``--resize``, and the
    student's nominal size (its card, the evaluation) is the teacher's input size, or the resize."""
    manifest = shards.read_manifest(location, cache_dir=cache_dir, offline=offline)
    if int(manifest["num_samples"]) < 2:
        raise DistillError(f"dataset {location} holds {manifest['num_samples']} samples; nothing to learn from")
    if not manifest.get("complete", True):
        warnings.warn(f"dataset {location} is incomplete ({manifest['num_samples']} of "
                      f"{manifest.get('target_samples')} samples); distilling from what is there", stacklevel=1)
    h, w, c = (int(v) for v in manifest["schema"]["image"]["shape"])
    k = int(manifest["num_classes"])
    where = f"dataset {location}"
    teacher_info: dict[str, Any] = manifest.get("teacher") or {}
    plan = plan_resolutions(manifest, resize)
    stored_shapes = [(c, sh, sw) for sh, sw in plan.sizes]
    if plan.mode == "resized" and plan.train_size:
        h, w = plan.train_size
        stored_shapes = [(c, h, w)]
    elif isinstance(teacher_info.get("input_size"), int) and (plan.mode != "single" or plan.sizes != ((h, w),)
                                                               or teacher_info["input_size"] != h):
        h = w = int(teacher_info["input_size"])
    if plan.mode != "single" or stored_shapes != [(c, h, w)]:
        print(f"{where}: {plan.describe()}; evaluating at {h}x{w}", file=sys.stderr)
    class_names = teacher_info.get("class_names") or [str(i) for i in range(k)]
    if len(class_names) != k:
        class_names = [str(i) for i in range(k)]
    counts = manifest.get("source_counts") or {}  # a set with condensed samples (synth --condensed)
    return DatasetView(manifest, plan, (c, h, w), stored_shapes, k, list(class_names), teacher_info, where,
                       counts if int(counts.get("condensed", 0)) > 0 else {})


def resolve_eval_data(eval_data: str | None, teacher_dataset: str | None, verbose: bool) -> str | None:
    """``auto``: the real dataset named on the teacher's card, when its files are on this machine."""
    if eval_data is None or eval_data.lower() == "none":
        return None
    if eval_data != "auto":
        return eval_data
    if not teacher_dataset:
        return None
    try:
        realdata.load(teacher_dataset, split="test", progress=False)
    except Exception:  # not on this machine: distil without evaluation rather than fail
        if verbose:
            print(f"note: the teacher was trained on {teacher_dataset!r}, which is not found here; "
                  "no evaluation (pass --eval-data SPEC)", file=sys.stderr)
        return None
    if verbose:
        print(f"evaluating on {teacher_dataset} (the teacher's dataset, from its card)", file=sys.stderr)
    return teacher_dataset


def manifest_digest(location: str, manifest: dict[str, Any]) -> tuple[str, str]:
    local = Path(location) / "manifest.json"
    if "://" not in location and local.is_file():
        return hashlib.sha256(local.read_bytes()).hexdigest(), "file"
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest(), "canonical-json"

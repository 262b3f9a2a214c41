"""``synth inspect``: what is in a dataset, how the teacher sees it, and how diverse it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import shards
import zoo
from atomicio import write_atomic

from .card import write_card
from .diversity import diversity_report, subsample, teacher_features


def _teacher_for(manifest: dict[str, Any], teacher_path: str | None,
                 trust_torchscript: bool = False) -> zoo.Classifier | None:
    """The given teacher, or the shipped one when it is the teacher that made the set."""
    if teacher_path:
        return zoo.load_classifier(teacher_path, trust_torchscript=trust_torchscript)
    default = zoo.default_teacher_path()
    if default.exists():
        teacher = zoo.load_classifier(default)
        if teacher.card.sha256 == manifest.get("teacher", {}).get("sha256"):
            return teacher
    return None


def _read(location: str, manifest: dict[str, Any], index: np.ndarray,
          per_class: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, shards.ShardArrays]:
    """(labels, logits, the images at ``index``, the grid's first ``per_class`` samples of each class), in one
    streamed pass that keeps no other image: memory follows ``--samples``, not the dataset (a stranger's set
    may be far larger decoded than on disk). A set of several sizes is resized to its largest."""
    sizes = shards.image_shapes(manifest)
    largest = max(s[0] for s in sizes) if len(sizes) > 1 else None
    wanted = set(index.tolist())
    labels, logits, kept, grid_images, grid_labels = [], [], {}, [], []
    shown = np.zeros(int(manifest["num_classes"]), dtype=np.int64)
    for i, (_key, image, label, logit, _meta) in enumerate(shards.iter_samples(location, manifest)):
        labels.append(label)
        logits.append(logit)
        if i in wanted or shown[label] < per_class:
            image = image if largest is None else shards.resize_image(image, largest)
            if i in wanted:
                kept[i] = image
            if shown[label] < per_class:
                shown[label] += 1
                grid_images.append(image)
                grid_labels.append(label)
    shape = list(grid_images[0].shape) if grid_images else (manifest["schema"]["image"]["shape"] or [0, 0, 0])
    grid = shards.ShardArrays(images=np.stack(grid_images) if grid_images else np.zeros((0, *shape), np.uint8),
                              labels=np.asarray(grid_labels, dtype=np.int64),
                              logits=np.zeros((len(grid_labels), len(shown)), np.float16), keys=[], manifest=manifest)
    images = np.stack([kept[i] for i in index.tolist()]) if len(index) else np.zeros((0, *shape), np.uint8)
    return np.asarray(labels, dtype=np.int64), np.stack(logits).astype(np.float32), images, grid


def inspect_dataset(location: str, grid: str | None = None, teacher_path: str | None = None,
                    reference: str | None = None, samples: int = 2000, device: str = "auto",
                    trust_torchscript: bool = False) -> dict[str, Any]:
    manifest = shards.read_manifest(location)
    num_classes = int(manifest["num_classes"])
    class_names = manifest.get("teacher", {}).get("class_names") or [str(i) for i in range(num_classes)]
    dev = zoo.pick_device(device)
    teacher = _teacher_for(manifest, teacher_path, trust_torchscript)
    index = subsample(int(manifest["num_samples"]), samples) if teacher is not None else np.zeros(0, np.int64)
    labels, logits, images, grid_arrays = _read(location, manifest, index)
    predicted = logits.argmax(axis=1)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    entropy = -(probabilities * np.log(np.clip(probabilities, 1e-12, None))).sum(axis=1)
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        per_class.append({
            "class": class_names[c], "count": int(mask.sum()),
            "teacher_agreement": float((predicted[mask] == c).mean()) if mask.any() else None,
            "teacher_predicted_as": int((predicted == c).sum()),
        })
    report: dict[str, Any] = {
        "location": location,
        "method": manifest.get("method", {}).get("name"),
        "teacher": {k: manifest.get("teacher", {}).get(k) for k in ("arch", "sha256", "test_accuracy")},
        "num_samples": int(len(labels)),
        "image_shape": list(grid_arrays.images.shape[1:]),
        "resolution_counts": manifest.get("resolution_counts"),
        "images_per_second_by_resolution": manifest.get("summary", {}).get("images_per_second_by_resolution"),
        "shards": len(manifest["shards"]),
        "bytes_per_sample": sum(s["bytes"] for s in manifest["shards"]) / max(len(labels), 1),
        "complete": manifest.get("complete"),
        "teacher_agreement": float((predicted == labels).mean()),
        "mean_entropy": float(entropy.mean()),
        "per_class": per_class,
        "agreement_over_run": agreement_over_run(manifest),
    }
    if teacher is not None:
        teacher = teacher.to(dev).eval()
        synthetic = teacher_features(teacher, images, dev)
        real = None
        if reference:
            import realdata

            real_set = realdata.load(reference, split="test")
            real_index = subsample(len(real_set.labels), samples)
            real = teacher_features(teacher, real_set.images[real_index], dev)
        report["diversity"] = diversity_report(synthetic, real)
    else:
        report["diversity"] = manifest.get("summary", {}).get("diversity")
        report["diversity_note"] = "pass --teacher to compute diversity figures (and --reference for FID/JS/MMD)"
    if grid is None and "://" not in location:
        grid = str(Path(location) / "samples.png")
    if grid:
        Path(grid).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(grid, lambda tmp: shards.sample_grid_png(grid_arrays, tmp, class_names=class_names))
        report["grid"] = grid
    if "://" not in location and Path(location).is_dir():
        # The card carries this report's figures (diversity measured with the teacher, when there is one).
        diversity = report["diversity"] if isinstance(report.get("diversity"), dict) else None
        card = write_card(location, manifest, diversity=diversity,
                          per_class_agreement=[row["teacher_agreement"] for row in per_class])
        report["card"] = str(card)
    return report


def agreement_over_run(manifest: dict[str, Any], parts: int = 10) -> list[dict[str, Any]]:
    """Teacher agreement with the asked label over consecutive stretches of the set, in the order it was made
    (shards by first index, grouped into at most ``parts`` stretches): shows a generator that drifts away
    from the asked classes as the run goes on, which the set's overall figure hides."""
    entries = sorted((s for s in manifest.get("shards", []) if s.get("agreement_count") is not None),
                     key=lambda s: s.get("first_index", 0))
    groups = np.array_split(np.arange(len(entries)), min(parts, len(entries))) if entries else []
    stretches = []
    for group in groups:
        chosen = [entries[i] for i in group]
        samples = sum(int(s["num_samples"]) for s in chosen)
        stretches.append({"first_index": int(chosen[0].get("first_index", 0)), "samples": samples,
                          "agreement": sum(int(s["agreement_count"]) for s in chosen) / max(samples, 1)})
    return stretches


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"dataset   {report['location']}  ({'complete' if report['complete'] else 'INCOMPLETE'})",
        f"method    {report['method']}",
        f"teacher   {report['teacher']['arch']}  sha256 {str(report['teacher']['sha256'])[:12]}…  "
        f"test acc {report['teacher']['test_accuracy']}",
        f"samples   {report['num_samples']}  images {report['image_shape']}  shards {report['shards']}  "
        f"{report['bytes_per_sample']:.0f} bytes/sample",
        f"teacher agreement with asked label  {report['teacher_agreement']:.1%}",
        f"mean teacher entropy                {report['mean_entropy']:.3f} nats",
    ]
    if report.get("resolution_counts") and len(report["resolution_counts"]) > 1:
        sizes_line = ", ".join(f"{size}: {count}" for size, count in report["resolution_counts"].items())
        lines.append(f"images per resolution               {sizes_line}")
    if report.get("images_per_second_by_resolution"):
        speeds = ", ".join(f"{size}: {speed}" for size, speed in report["images_per_second_by_resolution"].items())
        lines.append(f"synthesis images/s by resolution    {speeds}  (the last run)")
    stretches = report.get("agreement_over_run") or []
    if len(stretches) > 1:
        sizes = sorted({s["samples"] for s in stretches})
        size = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        shares = " ".join(f"{s['agreement']:.0%}" for s in stretches)
        lines.append(f"agreement over the run              {shares}  ({len(stretches)} stretches of {size} samples, "
                     "in the order made)")
    lines += [
        "",
        f"{'class':<16}{'count':>8}{'agreement':>11}{'predicted':>11}",
    ]
    for row in report["per_class"]:
        agreement = "-" if row["teacher_agreement"] is None else f"{row['teacher_agreement']:.1%}"
        lines.append(f"{row['class'][:15]:<16}{row['count']:>8}{agreement:>11}{row['teacher_predicted_as']:>11}")
    diversity = report.get("diversity")
    if diversity:
        lines.append("")
        lines.append("diversity (teacher feature space)")
        for key, value in diversity.items():
            lines.append(f"  {key:<24}{value:.4f}" if isinstance(value, float) else f"  {key:<24}{value}")
    if report.get("diversity_note"):
        lines.append(f"  ({report['diversity_note']})")
    if report.get("grid"):
        lines.append(f"\nsample grid written to {report['grid']}")
    if report.get("card"):
        lines.append(f"dataset card written to {report['card']}")
    return "\n".join(lines)

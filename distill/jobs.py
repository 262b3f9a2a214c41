"""What ``distill run`` and ``distill train`` share: checking that a model fits the data before any expensive
work, loading the evaluation set and the teacher, choosing augmentation, and writing a job's outputs.

Augmentation with stored logits (``--augment auto``): the stored logits belong to the stored pixels, so a
crop or flip makes the target slightly wrong, while augmentation fights overfitting of a small set. Measured
here (FMNIST-32, resnet8 teacher at 80.7 %, 5,000 real training images with its stored logits, resnet8
student, 10 epochs, batch 128, 2,000 test images, seeds 0/1): without augmentation 78.25 / 79.10 %, with
crop+flip 76.70 / 78.35 % — so ``auto`` trains on the stored views as they are, and turns crop+flip on only
where the target follows the view (a live ``--teacher``, or labels in ``distill train``). ``--augment on``
remains for large budgets on small synthetic sets, where overfitting may dominate.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import realdata
import zoo
from distill import report
from distill.bookkeeping import FitResult
from distill.core import DistillError, acceleration
from zoo.device import prepare_device, slow_precision_note

#: Whether ``--augment auto`` applies crop+flip when training on *stored* logits: no, measured (module docstring).
AUGMENT_STORED_LOGITS = False
EVAL_BATCH = 1024


@dataclass
class JobResult:
    out_dir: Path
    metrics: dict[str, Any]
    summary_line: str | None



def shape_text(channels: int, height: int, width: int) -> str:
    return f"{height}×{width}×{channels}"


def check_fits(model: nn.Module, shape_chw: tuple[int, int, int], num_classes: int, what: str, where: str) -> None:
    """Refuse ``model`` unless it maps one image of ``shape_chw`` to ``num_classes`` logits (a dry run
    on CPU, before any data is loaded)."""
    c, h, w = shape_chw
    holds = f"{where} holds {shape_text(c, h, w)} images of {num_classes} classes"
    card = getattr(model, "card", None)
    if card is not None:
        if card.in_channels != c:
            raise DistillError(f"{holds}; {what} is built for {card.in_channels}-channel input")
        if card.num_classes != num_classes:
            raise DistillError(f"{holds}; {what} has {card.num_classes} outputs")
    probe = model.to("cpu")
    was_training = probe.training
    probe.eval()
    try:
        with torch.no_grad():
            out = probe(torch.zeros(2, c, h, w))
    except (RuntimeError, ValueError) as exc:
        raise DistillError(f"{holds}; {what} cannot take them: {exc}") from None
    finally:
        probe.train(was_training)
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise DistillError(f"{holds}; {what} gives output of shape {tuple(out.shape[1:])}")


def load_eval(spec: str | None, size: int | None, max_samples: int | None, seed: int,
               shape: tuple[int, int, int], num_classes: int, where: str) -> realdata.RealDataset | None:
    if spec is None:
        return None
    ds = realdata.load(spec, split="test", size=size).subset(max_samples, seed=seed)
    if ds.input_shape != shape or ds.num_classes != num_classes:
        c, h, w = ds.input_shape
        raise DistillError(
            f"--eval-data {spec} holds {shape_text(c, h, w)} images of {ds.num_classes} classes, but "
            f"{where} holds {shape_text(*shape)} images of {num_classes} classes; "
            "pick the matching eval set (e.g. fmnist32 for FMNIST-32 shards)"
        )
    return ds


def resolve_augment(flag: str, live_teacher: bool, supervised: bool) -> bool:
    if flag == "on":
        return True
    if flag == "off":
        return False
    return True if (live_teacher or supervised) else AUGMENT_STORED_LOGITS


def configure_device(device: torch.device) -> None:
    """Device settings for a job, and a warning when ``--precision`` has no fast path on it."""
    if note := slow_precision_note(acceleration(device)):
        warnings.warn(note, stacklevel=1)
    prepare_device(device)


def load_teacher(path: str, arch: str | None, trust_torchscript: bool = False) -> zoo.Classifier:
    # Loaded on the CPU: check_fits probes it there before it moves to the training device. TorchScript runs
    # code as it loads, so only with --trust-torchscript.
    return zoo.load_classifier(path, arch=arch, map_location="cpu", trust_torchscript=trust_torchscript)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def summary_line(student_acc: float | None, teacher_acc: float | None) -> str | None:
    if student_acc is None:
        return None
    return f"student test accuracy: {percent(student_acc)} (teacher: {percent(teacher_acc)})"


def write_outputs(out: Path, metrics: dict[str, Any], result: FitResult, title: str,
                   teacher_acc: float | None) -> None:
    report.write_log_csv(out / "log.csv", result.history)
    report.plot_accuracy(out / "accuracy.png", result.history, title=title, teacher_accuracy=teacher_acc)
    report.write_json(out / "metrics.json", metrics)


def student_card_kwargs(card: Any) -> dict[str, Any]:
    return {k: getattr(card, k) for k in ("arch", "num_classes", "in_channels", "input_size", "mean", "std",
                                          "class_names")}

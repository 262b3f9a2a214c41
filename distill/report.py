"""What a distillation or training run leaves behind: ``metrics.json``, ``log.csv``, ``accuracy.png``.

Written atomically (:mod:`atomicio`: temporary file, fsync, rename) so a run killed mid-write never leaves a
half file next to a valid checkpoint. Peak memory is the figure the benchmark compares across devices: CUDA's
``max_memory_allocated`` on GPU, the process's maximum resident set size on CPU.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from atomicio import write_atomic, write_json_atomic
from zoo.device import peak_memory_bytes

#: Columns of log.csv, one row per epoch.
LOG_COLUMNS = ("epoch", "train_loss", "eval_acc", "lr", "images_per_s", "seconds")
#: Columns added only when a run has them (a mixed synthetic + condensed set; K-Gen's L_ed).
OPTIONAL_COLUMNS = ("condensed_share", "condensed_share_min", "condensed_share_max", "ed_loss")


def _write(path: Path, data: bytes) -> None:
    """:func:`atomicio.write_atomic`, creating the output directory first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, value, indent=2, sort_keys=False, default=str)


def write_log_csv(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """Rewrite the whole log from ``history`` (the checkpoint's copy), so a resumed run never repeats a row."""
    buf = io.StringIO()
    columns = list(LOG_COLUMNS) + [c for c in OPTIONAL_COLUMNS if any(c in row for row in history)]
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    _write(path, buf.getvalue().encode())


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def plot_accuracy(
    path: Path,
    history: Sequence[dict[str, Any]],
    *,
    title: str,
    teacher_accuracy: float | None = None,
) -> None:
    """Accuracy per epoch (percent), with the teacher as a dashed line when known; loss when no eval ran."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    acc = [row.get("eval_acc") for row in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        if any(a is not None for a in acc):
            ax.plot(epochs, [100 * a if a is not None else float("nan") for a in acc], marker=".", label="student")
            if teacher_accuracy is not None:
                ax.axhline(100 * teacher_accuracy, linestyle="--", color="grey", label="teacher")
            ax.set_ylabel("test accuracy (%)")
            ax.legend(loc="lower right")
        else:
            ax.plot(epochs, [row.get("train_loss") for row in history], marker=".")
            ax.set_ylabel("training loss (no --eval-data given)")
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    _write(path, buf.getvalue())


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory of this run: CUDA allocator peak on GPU, max RSS of this process on CPU (bytes)."""
    kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_max_rss"
    return {"kind": kind, "bytes": peak_memory_bytes(device)}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"

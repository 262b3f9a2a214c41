"""The teacher card: what a checkpoint's weights alone do not say.

A :class:`TeacherCard` records a classifier's architecture, number of classes, input channels and size,
the normalisation it was trained with, class names, the sha256 of its checkpoint file, and where it came
from (dataset, test accuracy, the command that trained it). It is stored as JSON beside the checkpoint,
``X.pt`` -> ``X.card.json`` (see :func:`card_path_for`), and travels into every synthetic dataset's
manifest as the teacher's identity.

Normalisation is part of that identity: the community's CIFAR-10 checkpoints disagree on the std
(0.2023, 0.1994, 0.2010 in one family, 0.2470, 0.2435, 0.2616 in another) and the wrong one silently costs
accuracy, so the card states it explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atomicio import write_json_atomic

from .errors import ZooError

__all__ = ["TeacherCard", "card_path_for", "DEFAULT_MEAN", "DEFAULT_STD"]

# Used when neither a card nor the caller states the normalisation (maps [0, 1] to [-1, 1]).
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5


def card_path_for(checkpoint: str | os.PathLike[str]) -> Path:
    """The card file that belongs to ``checkpoint``: ``dir/X.pt`` -> ``dir/X.card.json``."""
    path = Path(checkpoint)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(stem + ".card.json")


def _floats(value: Any, name: str, channels: int) -> tuple[float, ...]:
    if isinstance(value, int | float):
        value = [value]
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ZooError(f"card field '{name}' must be a list of numbers, got {value!r}") from exc
    if len(out) == 1 and channels > 1:
        out = out * channels  # one value for every channel
    if len(out) != channels:
        raise ZooError(f"card field '{name}' has {len(out)} values but in_channels is {channels}")
    if not all(math.isfinite(v) for v in out):
        raise ZooError(f"card field '{name}' must be finite, got {out}")
    return out


@dataclass
class TeacherCard:
    """Identity and metadata of a classifier checkpoint.

    Attributes:
        arch: architecture name (a :data:`zoo.ARCHITECTURES` name, ``tv:NAME`` or ``torchscript``).
        num_classes: number of outputs.
        in_channels: channels of the input image.
        input_size: side of the square input the network was trained on, in pixels.
        mean, std: per-channel normalisation applied to [0, 1] pixels, ``(x - mean) / std``;
            ``None`` means the default 0.5 / 0.5 (a single value is repeated for every channel).
        class_names: one name per class, ``["0", "1", ...]`` when not given.
        sha256: hex digest of the checkpoint file's bytes ("" until saved or loaded).
        test_accuracy: top-1 accuracy on the test set in [0, 1], if measured.
        dataset: what it was trained on (a :mod:`realdata` spec such as ``fmnist32``), if known.
        command: the command that produced it, if known.
    """

    arch: str
    num_classes: int
    in_channels: int = 3
    input_size: int = 32
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: list[str] = field(default_factory=list)
    sha256: str = ""
    test_accuracy: float | None = None
    dataset: str | None = None
    command: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise ZooError(f"card field 'arch' must be a non-empty string, got {self.arch!r}")
        for name in ("num_classes", "in_channels", "input_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ZooError(f"card field '{name}' must be a positive integer, got {value!r}")
        self.mean = _floats(DEFAULT_MEAN if self.mean is None else self.mean, "mean", self.in_channels)
        self.std = _floats(DEFAULT_STD if self.std is None else self.std, "std", self.in_channels)
        if any(s <= 0 for s in self.std):
            raise ZooError(f"card field 'std' must be positive, got {self.std}")
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
        self.class_names = [str(c) for c in self.class_names]
        if len(self.class_names) != self.num_classes:
            raise ZooError(f"card has {len(self.class_names)} class names but num_classes is {self.num_classes}")
        if self.test_accuracy is not None:
            self.test_accuracy = float(self.test_accuracy)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["mean"] = list(self.mean or ())
        data["std"] = list(self.std or ())
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherCard:
        """The card described by ``data``; unknown keys raise :class:`ZooError` naming them."""
        if not isinstance(data, dict):
            raise ZooError(f"a teacher card must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ZooError(f"unknown teacher card field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        missing = [n for n in ("arch", "num_classes") if n not in data]
        if missing:
            raise ZooError(f"teacher card lacks required field(s): {', '.join(missing)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TeacherCard:
        """A copy with ``changes`` applied; unknown field names raise :class:`ZooError`."""
        merged = self.to_dict()
        unknown = sorted(set(changes) - set(merged))
        if unknown:
            raise ZooError(f"unknown teacher card field(s): {', '.join(unknown)}")
        merged.update(changes)
        if "num_classes" in changes and "class_names" not in changes:
            merged["class_names"] = []  # regenerate the default names for the new count
        return TeacherCard.from_dict(merged)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the card as JSON to ``path`` atomically (:func:`atomicio.write_atomic`); returns the path."""
        path = Path(path)
        write_json_atomic(path, self.to_dict(), indent=2)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TeacherCard:
        """Reads a card written by :meth:`save`; malformed files raise :class:`ZooError` naming them."""
        data = read_card_dict(path)
        try:
            return cls.from_dict(data)
        except ZooError as exc:
            raise ZooError(f"{path}: {exc}") from exc


def read_card_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw JSON object of a card file, checked for unknown keys but not completed with defaults."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ZooError(f"no teacher card at {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ZooError(f"cannot read teacher card {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ZooError(f"teacher card {path} must hold a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(TeacherCard)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ZooError(
            f"{path}: unknown teacher card field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    return data

"""Condensed images (1-50 per class) for ``--condensed PATH``: read, checked against the teacher, in one place.

Three layouts are accepted:

* a **folder per class**: ``PATH/<class>/<image>`` where ``<class>`` is one of the teacher's class names or a
  class index (``0``, ``07``); any image PIL reads (PNG, JPEG, ...). ``synth condense`` writes this layout,
  which ``distill train --data imagefolder:PATH`` also reads;
* an **.npz** file with ``images`` (N×H×W×C, uint8 or float in [0, 1]) and ``labels`` (N integers), read with
  ``allow_pickle=False`` (a file from a stranger is data, not code);
* a **dataset directory** of this project's format (``manifest.json`` + shards): its images and labels.

Every problem is a :class:`CondensedDataError` naming the file and what would fit, raised before a run touches
the disk: a class the teacher does not have, a size or channel count that differs from the teacher's input
(``--condensed-resize`` resizes and converts instead), a class without images, more images in a class than
the stated maximum (the paper's range is 1-50 per class), an unreadable file. A teacher class without any
condensed image is refused too: the conditional discriminator judges every synthetic sample against the
condensed samples of its own class, so each class the generator is asked for needs at least one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from synth.errors import SynthError

#: The paper's range of condensed images per class (Sec. "Background": 1-50).
MAX_PER_CLASS = 50
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class CondensedDataError(SynthError):
    """``--condensed`` input that cannot be used with this teacher."""


@dataclass(frozen=True)
class CondensedSet:
    """Condensed images as uint8 N×H×W×C (the teacher's input shape) with their int64 labels."""

    images: np.ndarray
    labels: np.ndarray
    source: str  # the path, for messages and the manifest

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def per_class(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()

    @cached_property
    def sha256(self) -> str:
        """Of the content as read (shape, pixels, labels): a resume refuses a changed set, whatever its layout."""
        digest = hashlib.sha256(repr((self.images.shape, str(self.images.dtype))).encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(self.labels.astype("<i8").tobytes())
        return digest.hexdigest()


def load_condensed(path: str | Path, *, num_classes: int, shape: tuple[int, int, int],
                   class_names: list[str] | None = None, resize: bool = False,
                   max_per_class: int = MAX_PER_CLASS) -> CondensedSet:
    """Reads ``path`` (folder per class, .npz, or dataset directory) and checks it against a teacher of
    ``num_classes`` classes whose input is ``shape`` = (C, H, W)."""
    path = Path(path)
    if not path.exists():
        raise CondensedDataError(f"--condensed {path}: no such file or folder; give a folder per class, an .npz "
                                 "with images and labels, or a dataset directory")
    if path.is_dir() and (path / "manifest.json").is_file():
        images, labels = _read_dataset(path)
    elif path.is_dir():
        images, labels = _read_folders(path, num_classes, class_names, shape, resize)
    elif path.suffix.lower() == ".npz":
        images, labels = _read_npz(path)
    else:
        raise CondensedDataError(f"--condensed {path}: not a folder, an .npz file or a dataset directory")
    images = _fit_shape(images, shape, resize, path)
    _check_labels(labels, num_classes, max_per_class, path, class_names)
    return CondensedSet(np.ascontiguousarray(images), labels.astype(np.int64), str(path))


# -- the three layouts ----------------------------------------------------------------------------------


def _read_dataset(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import shards

    try:
        arrays = shards.load_arrays(path, progress=False)
    except shards.ShardError as error:
        raise CondensedDataError(f"--condensed {path}: unreadable dataset: {error}") from None
    return arrays.images, arrays.labels


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("images", "labels") if k not in data.files]
            if missing:
                raise CondensedDataError(f"--condensed {path}: lacks array(s) {', '.join(missing)}; an .npz needs "
                                         f"'images' (N×H×W×C) and 'labels' (N), it holds {', '.join(data.files)}")
            images, labels = data["images"], data["labels"]
    except CondensedDataError:
        raise
    except Exception as error:  # zip, format and pickle refusals all mean "cannot read this file"
        raise CondensedDataError(f"--condensed {path}: unreadable .npz ({type(error).__name__}: {error})") from None
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
        raise CondensedDataError(f"--condensed {path}: images {images.shape} and labels {labels.shape} do not "
                                 "fit; expected images N×H×W×C and labels N")
    if not np.issubdtype(labels.dtype, np.integer):
        raise CondensedDataError(f"--condensed {path}: labels are {labels.dtype}, expected integers")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating) or not np.isfinite(images).all() \
                or images.min() < 0 or images.max() > 1:
            raise CondensedDataError(f"--condensed {path}: images are {images.dtype}; expected uint8, or floats "
                                     "in [0, 1]")
        images = np.round(images * 255).astype(np.uint8)
    return images, labels


def _class_index(name: str, num_classes: int, class_names: list[str] | None) -> int | None:
    if class_names and name in class_names:
        return class_names.index(name)
    if name.isdigit() and int(name) < num_classes:
        return int(name)
    return None


def _read_folders(path: Path, num_classes: int, class_names: list[str] | None, shape: tuple[int, int, int],
                  resize: bool) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    folders = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise CondensedDataError(f"--condensed {path}: no class folders (expected {path}/<class>/<image>.png)")
    known = ", ".join(class_names) if class_names else f"0-{num_classes - 1}"
    unknown = [d.name for d in folders if _class_index(d.name, num_classes, class_names) is None]
    if unknown:
        raise CondensedDataError(f"--condensed {path}: class folder(s) {', '.join(unknown)} name classes the "
                                 f"teacher does not have; name them after its classes ({known}) or 0-"
                                 f"{num_classes - 1}")
    channels, height, width = shape
    images: list[np.ndarray] = []
    labels: list[int] = []
    for folder in folders:
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise CondensedDataError(f"--condensed {folder}: empty class folder (no {', '.join(IMAGE_EXTENSIONS)} "
                                     "files); give it 1 or more images or remove it")
        label = _class_index(folder.name, num_classes, class_names)
        for file in files:
            try:
                with Image.open(file) as img:
                    img.load()
                    grey = img.mode in ("1", "L", "LA", "I", "I;16", "F")
                    if resize:  # the teacher's channel count and size
                        img = img.convert("L" if channels == 1 else "RGB").resize((width, height),
                                                                                 Image.Resampling.BILINEAR)
                    else:
                        img = img.convert("L" if grey else "RGB")
                    array = np.asarray(img, dtype=np.uint8)
            except Exception as error:  # PIL raises many types for a damaged or foreign file
                raise CondensedDataError(f"--condensed {file}: unreadable image ({type(error).__name__}: "
                                         f"{error})") from None
            array = array[:, :, None] if array.ndim == 2 else array
            if array.shape != (height, width, channels) and not resize:
                raise CondensedDataError(
                    f"--condensed {file}: image is {array.shape[1]}x{array.shape[0]} with {array.shape[2]} "
                    f"channel(s), the teacher takes {width}x{height} with {channels}; pass --condensed-resize "
                    "to resize and convert")
            images.append(array)
            labels.append(int(label))  # type: ignore[arg-type]
    return np.stack(images), np.asarray(labels, dtype=np.int64)


# -- checks ---------------------------------------------------------------------------------------------


def _fit_shape(images: np.ndarray, shape: tuple[int, int, int], resize: bool, path: Path) -> np.ndarray:
    channels, height, width = shape
    if images.shape[1:] == (height, width, channels):
        return images
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise CondensedDataError(f"--condensed {path}: images of shape {list(images.shape[1:])} are not H×W×C "
                                 "with C 1 or 3")
    if not resize:
        raise CondensedDataError(
            f"--condensed {path}: images are {images.shape[2]}x{images.shape[1]} with {images.shape[3]} "
            f"channel(s), the teacher takes {width}x{height} with {channels}; pass --condensed-resize to resize "
            "and convert")
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if x.shape[1] != channels:  # grey to RGB repeats; RGB to grey is the luminance (ITU-R 601, as PIL's "L")
        x = x.repeat(1, 3, 1, 1) if channels == 3 else (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                                                        ).sum(1, keepdim=True)
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _check_labels(labels: np.ndarray, num_classes: int, max_per_class: int, path: Path,
                  class_names: list[str] | None) -> None:
    outside = sorted({int(v) for v in labels if not 0 <= int(v) < num_classes})
    if outside:
        raise CondensedDataError(f"--condensed {path}: label(s) {', '.join(map(str, outside[:10]))} name classes "
                                 f"the teacher does not have (it has {num_classes}: 0-{num_classes - 1})")
    counts = np.bincount(labels.astype(np.int64), minlength=num_classes)

    def name(k: int) -> str:
        return f"{k} ({class_names[k]})" if class_names and k < len(class_names) else str(k)

    empty = [name(k) for k in range(num_classes) if counts[k] == 0]
    if empty:
        raise CondensedDataError(f"--condensed {path}: class(es) {', '.join(empty)} have no images; the "
                                 f"discriminator needs 1-{max_per_class} condensed images for every class")
    over = [f"{name(k)}: {counts[k]}" for k in range(num_classes) if counts[k] > max_per_class]
    if over:
        raise CondensedDataError(f"--condensed {path}: more than {max_per_class} images per class ({'; '.join(over)})"
                                 f"; condensed sets hold 1-{max_per_class} per class (raise "
                                 "--condensed-max-per-class to allow more)")

"""``imagefolder:PATH``: one subfolder per class (sorted names = class indices), images read with PIL.

Splits: when PATH holds ``train/`` and ``test/`` (or ``val/``) subfolders those are the splits; otherwise
PATH's own class subfolders serve whichever split is asked (say so in your report: there is no held-out
set then). Images are converted to RGB, or kept grey when the first image is grey, so one folder gives one
channel count. With ``size`` every image is resized (shorter side to ``size``, then centre-cropped to
``size``×``size``); without it every image must already have the first image's size.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from realdata.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclass
class FolderIndex:
    """The files of one split, their labels and the decoded image geometry."""

    root: Path
    files: list[Path]
    labels: np.ndarray
    class_names: list[str]
    height: int
    width: int
    channels: int
    size: int | None

    def read(self, index: int) -> np.ndarray:
        """Decode one image to uint8 H×W×C (resized when ``size`` was given)."""
        return read_image(self.files[index], self.channels, self.size, (self.height, self.width))


def _split_root(path: Path, split: str) -> Path:
    if not path.is_dir():
        raise DataError(f"imagefolder location {path} is not a folder of class subfolders")
    names = ("train",) if split == "train" else ("test", "val")
    for name in names:
        if (path / name).is_dir():
            return path / name
    if (path / "train").is_dir() or (path / "test").is_dir() or (path / "val").is_dir():
        raise DataError(
            f"imagefolder {path} has split folders but no {' or '.join(names)}/ for split {split!r}"
        )
    return path


def index_folder(path: Path, split: str, size: int | None) -> FolderIndex:
    """List the images of ``split`` under ``path``; :class:`DataError` when there are none."""
    root = _split_root(path, split)
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise DataError(f"imagefolder {root} has no class subfolders (expected {root}/<class>/<image>.png)")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        for dirpath, _dirs, names in sorted(os.walk(root / name)):
            for file in sorted(names):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(Path(dirpath) / file)
                    labels.append(label)
    if not files:
        raise DataError(
            f"imagefolder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders"
        )
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(files[0]) as first:
            channels = 1 if first.mode in _GREY_MODES else 3
            width, height = first.size
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {files[0]}: {exc}") from exc
    if size is not None:
        height = width = size
    label_array = np.asarray(labels, dtype=np.int64)
    return FolderIndex(root, files, label_array, class_names, height, width, channels, size)


def read_image(file: Path, channels: int, size: int | None, expect_hw: tuple[int, int]) -> np.ndarray:
    """Decode ``file`` to uint8 H×W×C; :class:`DataError` naming it when unreadable or of the wrong size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None:
                w, h = img.size
                scale = size / min(w, h)
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                img = img.resize((nw, nh), Image.Resampling.BILINEAR)
                left, top = (nw - size) // 2, (nh - size) // 2
                img = img.crop((left, top, left + size, top + size))
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {file}: {exc}") from exc
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[:2] != expect_hw:
        raise DataError(
            f"image {file} is {arr.shape[1]}x{arr.shape[0]}, the folder's first image is "
            f"{expect_hw[1]}x{expect_hw[0]}; pass a size (--size N) to resize them all"
        )
    return arr


def load_all(index: FolderIndex, workers: int | None = None, progress: bool = True) -> np.ndarray:
    """Decode every image into one uint8 N×H×W×C array (threads: PIL decoding releases the GIL)."""
    from tqdm import tqdm

    out = np.empty((len(index.files), index.height, index.width, index.channels), dtype=np.uint8)

    def fill(i: int) -> None:
        out[i] = index.read(i)

    # A bar only where decoding takes noticeable time.
    show = progress and len(index.files) >= 2000
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool, tqdm(
        total=len(index.files), unit="img", desc=f"decode {index.root.name}", disable=not show, leave=False
    ) as bar:
        for _ in pool.map(fill, range(len(index.files))):
            bar.update(1)
    return out

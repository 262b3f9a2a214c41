"""Fashion-MNIST from its idx files (``train-images-idx3-ubyte.gz`` …), gzipped or plain.

The idx format: a big-endian magic ``0x0000 08 NDIM`` (0x08 = unsigned byte), then NDIM big-endian uint32
dimensions, then the bytes. Both the magic and the length are checked, so a truncated or foreign file is a
:class:`DataError` naming it rather than a reshape error later.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from realdata.errors import DataError

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_HOW_TO_GET = (
    "install the Debian package (apt-get install dataset-fashion-mnist, which fills "
    "/usr/share/datasets/fashion-mnist/), or point DFKD_FMNIST_DIR or fmnist:PATH at a folder holding "
    "the four idx files from https://github.com/zalandoresearch/fashion-mnist"
)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"Fashion-MNIST file {folder / (stem + '.gz')} not found; {_HOW_TO_GET}")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one idx file of unsigned bytes with ``ndim`` dimensions; :class:`DataError` when it is not one."""
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise DataError(f"cannot read idx file {path}: {exc} (corrupt or truncated download?)") from exc
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise DataError(f"idx file {path} is truncated: {len(raw)} bytes, shorter than its header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != 0x0800 + ndim:
        raise DataError(
            f"idx file {path} has magic 0x{magic:08x}, expected 0x{0x0800 + ndim:08x} "
            f"(unsigned bytes, {ndim} dimensions): not the file it is named after"
        )
    if len(raw) < header:
        raise DataError(f"idx file {path} is truncated: {len(raw)} bytes, shorter than its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(
            f"idx file {path} is truncated or padded: dims {dims} need {expected} bytes of data, "
            f"found {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fmnist(folder: Path, split: str, pad32: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 N×H×W×C and labels int64 of one split; ``pad32`` gives the 32×32×3 benchmark form."""
    if not folder.is_dir():
        raise DataError(f"Fashion-MNIST folder {folder} does not exist; {_HOW_TO_GET}")
    image_stem, label_stem = _FILES[split]
    images = read_idx(_find(folder, image_stem), 3)
    labels = read_idx(_find(folder, label_stem), 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(
            f"Fashion-MNIST {split} split in {folder}: {len(images)} images but {len(labels)} labels"
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise DataError(f"Fashion-MNIST labels in {folder} reach {labels.max()}, expected 0..9")
    if pad32:
        # 2 zero pixels each side (28 -> 32) so the CIFAR zoo applies unchanged; grey repeated to RGB.
        out = np.zeros((len(images), 32, 32, 3), dtype=np.uint8)
        out[:, 2:30, 2:30, :] = images[:, :, :, None]
        return out, labels
    return images[:, :, :, None].copy(), labels  # copy: frombuffer arrays are read-only

"""CIFAR-10/100 from the official python-pickle releases, read through a restricted unpickler.

The official files are pickles of plain dicts holding a numpy ``uint8`` array (``data``, N×3072, channel
planes R, G, B of 32×32) and lists of labels. A pickle can run arbitrary code, so :class:`_SafeUnpickler`
resolves only the few globals these files need — numpy's array reconstruction (``_reconstruct``,
``ndarray``, ``dtype``) and ``_codecs.encode`` (which protocol-2 pickles written by Python 3 use for
``bytes``) — and refuses every other global, so a doctored file fails instead of executing.

``PATH`` may be the extracted folder (``cifar-10-batches-py``), its parent, or the downloaded
``cifar-10-python.tar.gz`` itself (members are read from the archive without extracting it).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from realdata.errors import DataError

try:  # numpy >= 2 moved the module; both names occur in files in the wild.
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Stand-in for _codecs.encode: protocol-2 pickles from Python 3 spell bytes as encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only as encode(str, 'latin1')")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a CIFAR batch file"
            ) from None


def safe_unpickle(data: bytes, where: str) -> dict[str, Any]:
    """Unpickle one CIFAR file into a dict with ``str`` keys; :class:`DataError` on anything else."""
    try:
        # encoding='bytes' keeps Python 2 str as bytes, which numpy's array state needs.
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any failure here means a corrupt or foreign file
        raise DataError(f"cannot read CIFAR file {where}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR file {where} holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "names_key": "label_names",
        "labels_key": "labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "names_key": "fine_label_names",
        "labels_key": "fine_labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}


class _Source:
    """Reads member files from a folder or from the release archive."""

    def __init__(self, kind: str, path: Path) -> None:
        layout = _LAYOUT[kind]
        self.kind = kind
        self.archive: tarfile.TarFile | None = None
        self.folder: Path | None = None
        how = (
            f"download and extract {layout['url']} and pass {kind}:<the extracted {layout['folder']} folder>"
        )
        if path.is_file():
            try:
                self.archive = tarfile.open(path, "r:*")
                self.members = {Path(m.name).name: m for m in self.archive.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise DataError(f"{path} is not a readable {kind} archive: {exc}; {how}") from exc
            self.where = path
        elif (path / layout["folder"]).is_dir():
            self.folder = path / layout["folder"]
            self.where = self.folder
        elif path.is_dir():
            self.folder = path
            self.where = path
        else:
            raise DataError(f"{kind} location {path} does not exist; {how}")
        self.how = how

    def read(self, name: str) -> bytes:
        if self.archive is not None:
            member = self.members.get(name)
            if member is None:
                raise DataError(f"{self.where} has no member {name}; {self.how}")
            fh = self.archive.extractfile(member)
            assert fh is not None
            return fh.read()
        assert self.folder is not None
        file = self.folder / name
        if not file.is_file():
            raise DataError(f"{self.kind} file {file} not found; {self.how}")
        return file.read_bytes()


def load_cifar(kind: str, path: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images uint8 N×32×32×3, labels int64 and class names of one split of CIFAR-10 or CIFAR-100."""
    layout = _LAYOUT[kind]
    source = _Source(kind, path)
    meta = safe_unpickle(source.read(layout["meta"]), f"{source.where}/{layout['meta']}")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(layout["names_key"], [])]
    images, labels = [], []
    for name in layout[split]:
        where = f"{source.where}/{name}"
        batch = safe_unpickle(source.read(name), where)
        if "data" not in batch or layout["labels_key"] not in batch:
            raise DataError(f"CIFAR file {where} lacks 'data' or '{layout['labels_key']}'")
        data = np.asarray(batch["data"], dtype=np.uint8)
        lab = np.asarray(batch[layout["labels_key"]], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(lab):
            raise DataError(
                f"CIFAR file {where}: data shape {data.shape} with {len(lab)} labels, "
                "expected N×3072 with N labels"
            )
        # Rows are channel planes (R then G then B, each 32x32 row-major): N×3×32×32 -> N×32×32×3.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    out_labels = np.concatenate(labels)
    if not names:
        names = [str(i) for i in range(int(out_labels.max()) + 1 if out_labels.size else 0)]
    if out_labels.size and (out_labels.min() < 0 or out_labels.max() >= len(names)):
        raise DataError(f"{kind} labels in {source.where} fall outside 0..{len(names) - 1}")
    return np.ascontiguousarray(np.concatenate(images)), out_labels, names

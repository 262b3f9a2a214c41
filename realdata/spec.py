"""Dataset specs: one short string names a real dataset everywhere (CLIs, pipelines, tests).

Syntax: ``KIND`` or ``KIND:PATH``::

    fmnist              Fashion-MNIST, 28x28x1, from the system folder
    fmnist32            Fashion-MNIST padded to 32x32 and repeated to 3 channels (the project benchmark)
    fmnist:PATH         the same from the folder PATH holding the four idx files (.gz or not)
    fmnist32:PATH
    cifar10:PATH        the python-pickle release (cifar-10-batches-py/, its parent, or the .tar.gz)
    cifar100:PATH       the python-pickle release (cifar-100-python/, its parent, or the .tar.gz)
    imagefolder:PATH    PATH/<class>/<image> (or PATH/train/<class>/…, PATH/test/<class>/…)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from realdata.errors import DataError

#: kind -> one-line description (the error message for an unknown kind lists these).
KINDS: dict[str, str] = {
    "fmnist": "Fashion-MNIST 28x28x1 (optional :PATH to the idx files)",
    "fmnist32": "Fashion-MNIST padded to 32x32x3 (optional :PATH to the idx files)",
    "cifar10": "CIFAR-10 python release, :PATH required",
    "cifar100": "CIFAR-100 python release (fine labels), :PATH required",
    "imagefolder": "class subfolders of images, :PATH required",
}

#: Kinds that need no PATH because a system-wide default exists.
_DEFAULT_PATH_KINDS = {"fmnist", "fmnist32"}

#: Where the Debian package ``dataset-fashion-mnist`` puts the idx files.
DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist/"


def fmnist_dir() -> Path:
    """The default Fashion-MNIST folder; the ``DFKD_FMNIST_DIR`` environment variable overrides it."""
    return Path(os.environ.get("DFKD_FMNIST_DIR") or DEFAULT_FMNIST_DIR)


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed spec. ``path`` is ``None`` only for kinds with a default location."""

    kind: str
    path: Path | None
    text: str

    @property
    def name(self) -> str:
        """Short name for reports and default output folders (the kind, or kind + folder name)."""
        if self.path is None or self.kind in _DEFAULT_PATH_KINDS:
            return self.kind
        return f"{self.kind}-{self.path.name or 'data'}"

    def resolved_path(self) -> Path:
        """The folder (or archive) the data is read from."""
        if self.path is not None:
            return self.path
        return fmnist_dir()

    def __str__(self) -> str:
        return self.text


def parse_spec(spec: str | DatasetSpec) -> DatasetSpec:
    """Parse ``KIND`` or ``KIND:PATH``; raise :class:`DataError` listing the kinds when it does not fit."""
    if isinstance(spec, DatasetSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty dataset spec; use one of: {_kind_list()}")
    text = spec.strip()
    kind, sep, path = text.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise DataError(f"unknown dataset kind {kind!r} in spec {text!r}; known kinds: {_kind_list()}")
    if sep and not path:
        raise DataError(f"spec {text!r} has an empty PATH after ':'; write {kind}:PATH or just {kind}")
    if not sep and kind not in _DEFAULT_PATH_KINDS:
        raise DataError(f"spec {text!r} needs a location: write {kind}:PATH")
    return DatasetSpec(kind=kind, path=Path(path).expanduser() if sep else None, text=text)


def _kind_list() -> str:
    return "; ".join(f"{k} ({v})" for k, v in KINDS.items())

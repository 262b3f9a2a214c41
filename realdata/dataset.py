"""``RealDataset`` and ``load``: one split of a real dataset as uint8 arrays plus a torch view.

In-memory sets (Fashion-MNIST, CIFAR, small image folders) hold ``images`` as uint8 N×H×W×C — 4× smaller
than float and the layout the shards use, so the distillation code treats real and synthetic data alike.
Large image folders stay on disk (``images is None``) and decode per item.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from realdata.errors import DataError
from realdata.spec import DatasetSpec, parse_spec

#: Per-kind normalisation hints (mean, std per channel, pixel values in [0, 1]).
#: fmnist / fmnist32 were computed from the 60k training images (population std over all pixels,
#: the 2-pixel zero border included for fmnist32) with:
#:   python -c "import realdata; x = realdata.load('fmnist32').images[..., 0] / 255.0; \
#:              print(x.mean(), x.std())"
#: cifar10 / cifar100 are the values the DFKD literature uses (the 0.2470 family of CIFAR-10 std).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fmnist": ((0.2860,), (0.3530,)),
    "fmnist32": ((0.2190, 0.2190, 0.2190), (0.3318, 0.3318, 0.3318)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

#: Image folders whose decoded size stays below this load into memory at once; larger ones decode per item.
IMAGEFOLDER_MEMORY_LIMIT = 2 * 1024**3

SPLITS = ("train", "test")


class RealDataset(Dataset):
    """One split of a real dataset.

    ``images``: uint8 N×H×W×C (``None`` for a folder too large to hold in memory), ``labels``: int64 [N],
    ``class_names``, ``num_classes``, ``input_shape`` (C, H, W). Indexing yields ``(float CHW in [0, 1],
    label)``; :meth:`tensor` gives the whole set as a float NCHW tensor, :meth:`uint8_nhwc` as uint8.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        split: str,
        labels: np.ndarray,
        class_names: list[str],
        input_shape: tuple[int, int, int],
        images: np.ndarray | None = None,
        reader: Callable[[int], np.ndarray] | None = None,
        source: Path | None = None,
    ) -> None:
        if images is None and reader is None:
            raise ValueError("a RealDataset needs images or a reader")
        self.spec = spec
        self.split = split
        self.images = images
        self.labels = labels
        self.class_names = list(class_names)
        self.input_shape = input_shape
        self.source = source
        self._reader = reader

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def nbytes(self) -> int:
        """Decoded size in bytes (uint8), whether or not it is in memory."""
        c, h, w = self.input_shape
        return len(self) * c * h * w

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> np.ndarray:
        """uint8 H×W×C of one sample."""
        if self.images is not None:
            return self.images[index]
        assert self._reader is not None
        return self._reader(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.ascontiguousarray(self.image(index)))
        return img.permute(2, 0, 1).float().div_(255.0), int(self.labels[index])

    def uint8_nhwc(self) -> torch.Tensor:
        """The whole split as a uint8 N×H×W×C tensor (shares memory with ``images``)."""
        return torch.from_numpy(self.materialize().images)  # type: ignore[arg-type]

    def tensor(self) -> torch.Tensor:
        """The whole split as float N×C×H×W in [0, 1] (4 bytes a value: mind the size of large sets)."""
        return self.uint8_nhwc().permute(0, 3, 1, 2).float().div_(255.0)

    def materialize(self) -> RealDataset:
        """Decode every image into ``images`` (no-op for in-memory sets); returns ``self``."""
        if self.images is None:
            c, h, w = self.input_shape
            out = np.empty((len(self), h, w, c), dtype=np.uint8)
            for i in range(len(self)):
                out[i] = self.image(i)
            self.images = out
        return self

    def subset(self, n: int | None, seed: int = 0) -> RealDataset:
        """A random subset of ``n`` samples (all when ``n`` is None or ≥ len), the same for the same seed."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise DataError(f"a subset needs at least one sample, asked for {n}")
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        reader = None if self._reader is None else _SubsetReader(self._reader, idx)
        return RealDataset(
            self.spec,
            self.split,
            self.labels[idx],
            self.class_names,
            self.input_shape,
            images=None if self.images is None else self.images[idx],
            reader=reader,
            source=self.source,
        )

    def __repr__(self) -> str:
        c, h, w = self.input_shape
        return (
            f"RealDataset({self.spec.text!r}, split={self.split!r}, n={len(self)}, {h}x{w}x{c}, "
            f"{self.num_classes} classes)"
        )


class _SubsetReader:
    """Reads item ``i`` of a subset as item ``idx[i]`` of its parent (a class, not a lambda, so DataLoader
    workers started with ``spawn`` can pickle it)."""

    def __init__(self, base: Callable[[int], np.ndarray], idx: np.ndarray) -> None:
        self.base = base
        self.idx = idx

    def __call__(self, i: int) -> np.ndarray:
        return self.base(int(self.idx[i]))


def load(
    spec: str | DatasetSpec, split: str = "train", *, size: int | None = None, progress: bool = True
) -> RealDataset:
    """Load one split (``"train"`` or ``"test"``) of the dataset ``spec`` names.

    ``size`` resizes image-folder images to ``size``×``size`` (ignored by the fixed-size kinds, which
    refuse a different size); ``progress`` shows a bar while a large image folder decodes. Raises
    :class:`DataError` for unknown kinds, missing or corrupt files.
    """
    parsed = parse_spec(spec)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    path = parsed.resolved_path()
    if parsed.kind in ("fmnist", "fmnist32"):
        from realdata.fmnist import CLASS_NAMES, load_fmnist

        images, labels = load_fmnist(path, split, pad32=parsed.kind == "fmnist32")
        names = list(CLASS_NAMES)
    elif parsed.kind in ("cifar10", "cifar100"):
        from realdata.cifar import load_cifar

        images, labels, names = load_cifar(parsed.kind, path, split)
    else:
        from realdata.imagefolder import index_folder, load_all

        index = index_folder(path, split, size)
        shape = (index.channels, index.height, index.width)
        ds = RealDataset(
            parsed, split, index.labels, index.class_names, shape, reader=index.read, source=index.root
        )
        if ds.nbytes <= IMAGEFOLDER_MEMORY_LIMIT:
            ds.images = load_all(index, progress=progress)
        return ds
    if size is not None and size != images.shape[1]:
        raise DataError(
            f"{parsed.kind} images are {images.shape[1]}x{images.shape[2]}; size={size} applies only to "
            f"imagefolder specs"
        )
    shape = (images.shape[3], images.shape[1], images.shape[2])
    return RealDataset(parsed, split, labels, names, shape, images=images, source=path)


def normalization(
    dataset: RealDataset, max_samples: int = 10000
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel: the :data:`NORMALIZATION` hint for known kinds, else measured on up to
    ``max_samples`` training images (seeded, so the same folder gives the same numbers)."""
    hint = NORMALIZATION.get(dataset.spec.kind)
    if hint is not None:
        return hint
    if dataset.images is not None and len(dataset) <= max_samples:
        sample = dataset.images
    else:  # decode a seeded subset without materialising (or mutating) the dataset itself
        idx = np.sort(np.random.default_rng(0).permutation(len(dataset))[:max_samples])
        sample = np.stack([dataset.image(int(i)) for i in idx])
    x = sample.reshape(-1, sample.shape[-1]).astype(np.float64) / 255.0
    std = np.maximum(x.std(axis=0), 1e-3)  # a constant channel would otherwise divide by zero
    return tuple(round(float(v), 4) for v in x.mean(axis=0)), tuple(round(float(v), 4) for v in std)

"""Real datasets named by one spec string (``fmnist32``, ``cifar10:PATH``, ``imagefolder:PATH`` …).

Used by ``distill train`` (teachers and the real-data references), by ``--eval-data`` everywhere, and by
the benchmark. Images come as uint8 N×H×W×C arrays (pixel space; normalisation belongs to the network)::

    ds = realdata.load("fmnist32", split="test")     # ds.images (10000, 32, 32, 3) uint8, ds.labels int64
    x, y = ds[0]                                      # float CHW in [0, 1], int
    mean, std = realdata.NORMALIZATION["fmnist32"]
"""

from realdata.dataset import NORMALIZATION, SPLITS, RealDataset, load, normalization
from realdata.errors import DataError
from realdata.spec import DEFAULT_FMNIST_DIR, KINDS, DatasetSpec, fmnist_dir, parse_spec

__all__ = [
    "DEFAULT_FMNIST_DIR",
    "KINDS",
    "NORMALIZATION",
    "SPLITS",
    "DataError",
    "DatasetSpec",
    "RealDataset",
    "fmnist_dir",
    "load",
    "normalization",
    "parse_spec",
]

"""realdata: spec parsing, Fashion-MNIST from the system folder, CIFAR pickles, image folders, errors."""

from __future__ import annotations

import gzip
import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import realdata
from realdata import DataError

FMNIST_DIR = realdata.fmnist_dir()
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


# ---------------------------------------------------------------- specs


def test_parse_spec_kinds_and_paths(tmp_path: Path) -> None:
    spec = realdata.parse_spec("fmnist32")
    assert (spec.kind, spec.path) == ("fmnist32", None)
    spec = realdata.parse_spec(f"cifar10:{tmp_path}")
    assert (spec.kind, spec.path) == ("cifar10", tmp_path)
    assert realdata.parse_spec("imagefolder:/a:b").path == Path("/a:b")  # only the first ':' splits


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("mnist", "known kinds: fmnist"),
        ("", "empty dataset spec"),
        ("cifar10", "needs a location"),
        ("imagefolder:", "empty PATH"),
    ],
)
def test_parse_spec_errors(spec: str, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        realdata.parse_spec(spec)


def test_unknown_split() -> None:
    with pytest.raises(DataError, match="unknown split"):
        realdata.load("fmnist32", split="validation")


# ---------------------------------------------------------------- Fashion-MNIST


@needs_fmnist
def test_fmnist32_test_split() -> None:
    ds = realdata.load("fmnist32", split="test")
    assert ds.images is not None and ds.images.shape == (10000, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and ds.labels.shape == (10000,)
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    # padding is 2 zero pixels each side, the three channels are the same grey image
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert ds.images[:, border].max() == 0
    assert (ds.images[..., 0] == ds.images[..., 2]).all()
    plain = realdata.load("fmnist", split="test")
    assert plain.images.shape == (10000, 28, 28, 1)
    assert np.array_equal(plain.images[..., 0], ds.images[:, 2:30, 2:30, 1])
    assert np.array_equal(plain.labels, ds.labels)
    # the torch views: float [0, 1] CHW per item, NCHW for the whole set
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert y == int(ds.labels[0])
    sub = ds.subset(100, seed=1)
    assert sub.tensor().shape == (100, 3, 32, 32) and len(sub) == 100


@needs_fmnist
def test_fmnist32_normalization_hint_matches_training_set() -> None:
    images = realdata.load("fmnist32", split="train").images[..., 0] / 255.0
    mean, std = realdata.NORMALIZATION["fmnist32"]
    assert abs(images.mean() - mean[0]) < 1e-4 and abs(images.std() - std[0]) < 1e-4


def test_fmnist_missing_folder_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFKD_FMNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        realdata.load("fmnist32")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz not found"):
        realdata.load(f"fmnist:{tmp_path}", split="test")


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], data: bytes, gz: bool = True) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    opener = gzip.open if gz else open
    with opener(path, "wb") as fh:
        fh.write(header + data)


def test_fmnist_from_path_and_corrupt_idx(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, (5, 28, 28), pixels.tobytes())
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", 0x801, (5,), bytes([0, 1, 2, 3, 9]), gz=False)
    ds = realdata.load(f"fmnist32:{tmp_path}", split="test")
    assert np.array_equal(ds.images[:, 2:30, 2:30, 0], pixels) and ds.labels.tolist() == [0, 1, 2, 3, 9]

    # bad magic (labels file where images are expected)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x801, (5,), bytes(5))
    with pytest.raises(DataError, match="magic 0x00000801"):
        realdata.load(f"fmnist:{tmp_path}", split="test")
    # data shorter than the header promises
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, (5, 28, 28), pixels.tobytes()[:-7])
    with pytest.raises(DataError, match="truncated"):
        realdata.load(f"fmnist:{tmp_path}", split="test")
    # a gzip stream cut short
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, (5, 28, 28), pixels.tobytes())
    raw = (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        realdata.load(f"fmnist:{tmp_path}", split="test")


# ---------------------------------------------------------------- CIFAR


def _cifar_batch(rng: np.random.Generator, n: int, classes: int, key: bytes = b"labels") -> dict:
    return {
        b"batch_label": b"fake batch",
        key: [int(v) for v in rng.integers(0, classes, n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [b"x.png"] * n,
    }


def _write_cifar10(folder: Path) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": _cifar_batch(rng, 4, 10) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(rng, 3, 10)
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": 4}
    for name, obj in [*batches.items(), ("batches.meta", meta)]:
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    return batches


def test_cifar10_folder_loads(tmp_path: Path) -> None:
    batches = _write_cifar10(tmp_path / "cifar-10-batches-py")
    for location in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        train = realdata.load(f"cifar10:{location}", split="train")
        assert train.images.shape == (20, 32, 32, 3) and train.class_names[3] == "class3"
        test = realdata.load(f"cifar10:{location}", split="test")
        assert test.images.shape == (3, 32, 32, 3)
    first = batches["data_batch_1"]
    # row = R plane, then G plane, then B plane, each 32x32 row-major
    assert np.array_equal(train.images[0, :, :, 1], first[b"data"][0, 1024:2048].reshape(32, 32))
    assert train.labels[:4].tolist() == first[b"labels"]
    assert realdata.NORMALIZATION["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def test_cifar10_archive_loads(tmp_path: Path) -> None:
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    assert realdata.load(f"cifar10:{archive}", split="test").images.shape == (3, 32, 32, 3)


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split in ("train", "test"):
        batch = _cifar_batch(rng, 6, 100, key=b"fine_labels")
        batch[b"coarse_labels"] = [0] * 6
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": []}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    ds = realdata.load(f"cifar100:{tmp_path}", split="test")
    assert ds.num_classes == 100 and ds.labels.max() < 100 and ds.images.shape == (6, 32, 32, 3)


class _Evil:
    def __reduce__(self):  # would run shutil.rmtree on load with a plain pickle.load
        return (shutil.rmtree, ("/nonexistent-dfkd-test",))


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    _write_cifar10(tmp_path / "c")
    (tmp_path / "c" / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"shutil\.rmtree is not allowed"):
        realdata.load(f"cifar10:{tmp_path / 'c'}", split="test")


def test_cifar_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        realdata.load(f"cifar10:{tmp_path / 'none'}")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(DataError, match=r"batches\.meta not found.*cifar-10-python\.tar\.gz"):
        realdata.load(f"cifar10:{tmp_path / 'empty'}")


# ---------------------------------------------------------------- image folders


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def test_imagefolder_splits_and_resize(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for cls, color in (("cat", (255, 0, 0)), ("ant", (0, 0, 255))):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", color)
    train = realdata.load(f"imagefolder:{tmp_path}", split="train")
    assert train.class_names == ["ant", "cat"]  # sorted: "ant" is class 0
    assert train.images.shape == (6, 6, 8, 3) and train.input_shape == (3, 6, 8)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.images[0, 0, 0].tolist() == [0, 0, 255] and train.images[-1, 0, 0].tolist() == [255, 0, 0]
    test = realdata.load(f"imagefolder:{tmp_path}", split="test", size=4)
    assert test.images.shape == (4, 4, 4, 3) and len(test) == 4
    mean, std = realdata.normalization(train)
    assert len(mean) == 3 and mean[0] == pytest.approx(0.5, abs=1e-3)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class subfolders"):
        tmp_path.joinpath("empty").mkdir()
        realdata.load(f"imagefolder:{tmp_path / 'empty'}")
    _png(tmp_path / "mixed" / "a" / "0.png", (1, 2, 3), size=(8, 8))
    _png(tmp_path / "mixed" / "a" / "1.png", (1, 2, 3), size=(9, 8))
    with pytest.raises(DataError, match=r"1\.png is 9x8.*--size"):
        realdata.load(f"imagefolder:{tmp_path / 'mixed'}")
    assert realdata.load(f"imagefolder:{tmp_path / 'mixed'}", size=5).images.shape == (2, 5, 5, 3)
    (tmp_path / "mixed" / "a" / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"2\.png"):
        realdata.load(f"imagefolder:{tmp_path / 'mixed'}", size=5)


def test_an_image_past_pils_decompression_limit_is_a_data_error_naming_it(tmp_path: Path, monkeypatch) -> None:
    """A stranger's folder may hold a decompression bomb: a small file that decodes to billions of pixels. PIL
    refuses it (DecompressionBombError, not an OSError); the user gets the file's name, not a traceback."""
    from PIL import Image

    _png(tmp_path / "a" / "0.png", (1, 2, 3), size=(8, 8))
    _png(tmp_path / "a" / "1.png", (1, 2, 3), size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is past twice this: a bomb at this limit
    with pytest.raises(DataError, match=r"1\.png.*decompression bomb"):
        realdata.load(f"imagefolder:{tmp_path}", size=8)

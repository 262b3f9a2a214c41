"""Tests of the dataset contract's read side (shards/): round trip, determinism, verification, refusal of bad
manifests and damaged shards, remote locations."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from shardkit import HEADER, IDENTITY, NUM_CLASSES, REPO, expected_stats, flip_byte, make_samples, write_dataset

import shards
from shards.format import encode_npy, encode_png

# ------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("shape", [(8, 8, 3), (8, 6, 1)])
def test_round_trip_arrays_stream_and_manifest(tmp_path: Path, shape: tuple[int, int, int]) -> None:
    written = write_dataset(tmp_path / "ds", shape=shape)
    # URLs are relative: move the directory and read it from its new place only.
    moved = tmp_path / "elsewhere" / "ds"
    shutil.copytree(tmp_path / "ds", moved)
    shutil.rmtree(tmp_path / "ds")

    manifest = shards.read_manifest(moved)
    assert manifest["format"] == shards.FORMAT_NAME and manifest["format_version"] == shards.FORMAT_VERSION
    assert manifest["num_samples"] == 11 and manifest["complete"] and manifest["target_samples"] == 11
    assert [e["url"] for e in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(3)]
    assert [e["num_samples"] for e in manifest["shards"]] == [4, 4, 3]
    assert manifest["schema"]["image"]["shape"] == list(shape) and manifest["num_classes"] == NUM_CLASSES
    assert manifest["class_counts"] == np.bincount([s.label for s in written], minlength=NUM_CLASSES).tolist()
    agreement, entropy = expected_stats(written)
    assert manifest["summary"]["teacher_agreement"] == pytest.approx(agreement)
    assert manifest["summary"]["mean_entropy"] == pytest.approx(entropy, rel=1e-9)
    assert manifest["summary"]["diversity"] == 0.25
    assert manifest["method"] == HEADER["method"] and manifest["identity"] == IDENTITY
    assert manifest["resume_state"] is None and not (moved / "resume").exists()
    assert "/" not in json.dumps([e["url"] for e in manifest["shards"]])

    arrays = shards.load_arrays(moved, progress=False)
    assert arrays.images.dtype == np.uint8 and arrays.images.shape == (11, *shape)
    assert arrays.labels.dtype == np.int64 and arrays.logits.dtype == np.float16
    assert arrays.keys == [s.key for s in written]
    assert np.array_equal(arrays.images, np.stack([s.image for s in written]))
    assert arrays.labels.tolist() == [s.label for s in written]
    assert arrays.logits.tobytes() == np.stack([s.logits for s in written]).tobytes()
    assert arrays.meta[3] == {"source": "synthetic", "stage": 1, "resolution": list(shape[:2])}

    ordered = list(shards.stream(moved, shuffle=0))
    assert len(ordered) == 11
    for (image, label, logits), sample in zip(ordered, written, strict=True):
        assert image.tobytes() == sample.image.tobytes() and image.shape == shape
        assert label == sample.label and logits.tobytes() == sample.logits.tobytes()
    shuffled = list(shards.stream(moved, shuffle=5, seed=3))
    assert sorted(x[0].tobytes() for x in shuffled) == sorted(s.image.tobytes() for s in written)
    assert shards.verify(moved) == []


def test_shards_are_plain_webdataset_and_need_no_pickle(tmp_path: Path) -> None:
    import webdataset as wds

    written = write_dataset(tmp_path)
    urls = shards.shard_urls(tmp_path)
    raw = list(wds.WebDataset(urls, shardshuffle=False))
    assert [r["__key__"] for r in raw] == [s.key for s in written]
    assert set(raw[0]) >= {"png", "cls", "logits.npy", "json"}
    import io

    logits = np.load(io.BytesIO(raw[0]["logits.npy"]), allow_pickle=False)
    assert logits.dtype == np.float16 and logits.tobytes() == written[0].logits.tobytes()
    assert int(raw[0]["cls"]) == written[0].label
    assert json.loads(raw[0]["json"])["source"] == "synthetic"
    with tarfile.open(urls[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == sorted(m.name for m in members[:4])
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.mode == 0o644 for m in members)


def test_decode_sample_refuses_pickled_logits() -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    sample = make_samples(0, 1)[0]
    raw = {"__key__": "000000000", "__url__": "http://x/shard-000007.tar", "png": encode_png(sample.image),
           "cls": b"1", "logits.npy": buffer.getvalue()}
    with pytest.raises(shards.ShardError, match=r"shard-000007\.tar.*000000000"):
        shards.decode_sample(raw)
    raw["logits.npy"] = encode_npy(sample.logits)
    image, label, logits = shards.decode_sample(raw)
    assert image.tobytes() == sample.image.tobytes() and label == 1 and logits.dtype == np.float16
    manifest = {"num_classes": NUM_CLASSES, "schema": {"image": {"shape": [4, 4, 3]}}}
    with pytest.raises(shards.ShardError, match=r"shard-000007\.tar.*differs from the manifest"):
        shards.decode_sample(raw, manifest)


def test_import_needs_no_torch_and_reader_streaming_do_not_cycle() -> None:
    # In a fresh process: importing shards (and the streaming module first of all) must work, and only
    # shards.stream (webdataset) may bring in torch.
    code = ("import sys, shards; assert 'torch' not in sys.modules, 'import shards imported torch'; "
            "import shards.streaming")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    subprocess.run([sys.executable, "-c", "import shards.streaming, shards.reader"], cwd=REPO, check=True,
                   timeout=120)
    streaming_source = (REPO / "shards" / "streaming.py").read_text(encoding="utf-8")
    assert "from .reader" not in streaming_source and "shards.reader import" not in streaming_source


def test_load_arrays_with_worker_processes_matches(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    serial = shards.load_arrays(tmp_path, progress=False)
    parallel = shards.load_arrays(tmp_path, workers=2, progress=False)
    assert parallel.keys == serial.keys
    assert np.array_equal(parallel.images, serial.images) and np.array_equal(parallel.logits, serial.logits)


def test_stream_epochs_resampling_and_workers(tmp_path: Path) -> None:
    import torch

    write_dataset(tmp_path, sizes=(3, 3, 3, 3))
    def order(ds: shards.ShardStream) -> list[int]:
        return [int(x[2].astype(np.float32).sum() * 1000) for x in ds]
    a = order(shards.stream(tmp_path, shuffle=4, seed=1, epoch=2))
    assert a == order(shards.stream(tmp_path, shuffle=4, seed=1, epoch=2))
    ds = shards.stream(tmp_path, shuffle=4, seed=1, epoch=0)
    first, second = order(ds), order(ds)  # iterating again advances the epoch
    ds.set_epoch(0)
    assert order(ds) == first and sorted(first) == sorted(second) == sorted(a)
    assert ds.num_samples == 12 and ds.num_shards == 4

    endless = shards.stream(tmp_path, resampled=True, seed=5).with_epoch(30)
    assert len(list(endless)) == 30

    batches = list(shards.stream(tmp_path, shuffle=0).batched(5))
    assert [b[0].shape for b in batches] == [(5, 8, 8, 3), (5, 8, 8, 3), (2, 8, 8, 3)]

    # DataLoader workers split the shards between them: every sample exactly once.
    loader = torch.utils.data.DataLoader(shards.stream(tmp_path, shuffle=0), batch_size=None, num_workers=2)
    seen = sorted(int(np.asarray(x[2], dtype=np.float32).sum() * 1000) for x in loader)
    assert seen == sorted(a)


def test_same_samples_give_identical_bytes(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a")
    write_dataset(tmp_path / "b")
    for i in range(3):
        name = f"shard-{i:06d}.tar"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert shards.read_manifest(tmp_path / "a")["shards"] == shards.read_manifest(tmp_path / "b")["shards"]


def test_summary_and_grid(tmp_path: Path) -> None:
    written = write_dataset(tmp_path / "ds")
    summary = shards.summarize(tmp_path / "ds")
    agreement, entropy = expected_stats(written)
    assert summary["num_samples"] == 11 and summary["teacher_agreement"] == pytest.approx(agreement)
    assert summary["mean_entropy"] == pytest.approx(entropy) and summary["per_class"][0]["name"] == "a"
    path = shards.sample_grid_png(shards.load_arrays(tmp_path / "ds", progress=False), tmp_path / "grid.png")
    from PIL import Image

    with Image.open(path) as grid:
        assert grid.format == "PNG" and grid.height >= NUM_CLASSES * 64


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_strict_tar_reader_reads_what_tarfile_writes(fmt: int) -> None:
    import io

    from shards.tario import iter_tar

    names = ["000000000.png", "dir/" + "d" * 120 + "/000000001.cls"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["x" * 150 + ".json", "ünïcode.npy"]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 700 * i
            tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
    members = list(iter_tar(io.BytesIO(buffer.getvalue()), "t.tar"))
    assert [m[0] for m in members] == names
    assert [m[1] for m in members] == [bytes([i]) * 700 * i for i in range(len(names))]
    with pytest.raises(shards.ShardError, match="t.tar.*truncated"):
        list(iter_tar(io.BytesIO(buffer.getvalue()[:1500]), "t.tar"))


def test_unknown_format_version_and_bad_manifests(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for action in (lambda: shards.read_manifest(tmp_path), lambda: shards.load_arrays(tmp_path, progress=False),
                   lambda: shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=11,
                                                   shard_size=4)):
        with pytest.raises(shards.ShardError, match=r"format_version 99 is not supported.*reads format_version 1"):
            action()
    assert [p.shard for p in shards.verify(tmp_path)] == ["manifest.json"]

    manifest["format_version"] = 1
    manifest["shards"][0]["url"] = "../../etc/passwd"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(shards.ShardError, match="not a plain relative name"):
        shards.read_manifest(tmp_path)
    del manifest["num_samples"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(shards.ShardError, match="manifest.json.*num_samples"):
        shards.read_manifest(tmp_path)
    with pytest.raises(shards.ShardError, match="no such dataset"):
        shards.read_manifest(tmp_path / "nowhere")


def test_missing_shard_is_named(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(shards.ShardError, match=r"shard-000001\.tar is missing"):
        shards.load_arrays(tmp_path, progress=False)
    with pytest.raises(shards.ShardError, match=r"shard-000001\.tar is missing"):
        shards.stream(tmp_path)
    with pytest.raises(shards.ShardError, match=r"shard-000001\.tar is missing"):
        list(shards.stream(tmp_path, verify_local=False, shuffle=0))
    with pytest.raises(shards.ShardError, match=r"shard-000001\.tar is missing"):
        shards.check_shard(tmp_path / "shard-000001.tar", shards.read_manifest(tmp_path)["shards"][1])
    assert [p.shard for p in shards.verify(tmp_path)] == ["shard-000001.tar"]
    with pytest.raises(shards.ShardError, match="damaged"):
        shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=11, shard_size=4)


def _member_offsets(path: Path) -> tuple[int, int]:
    """(byte inside the second sample's PNG payload, byte inside the second sample's first tar header)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    png = next(m for m in members if m.name.endswith(".png") and m.name.startswith("000000005"))
    header = next(m for m in members if m.name.startswith("000000005"))
    return png.offset_data + png.size // 2, header.offset + 3


@pytest.mark.parametrize("where", ["png_payload", "tar_header"])
def test_one_flipped_byte_is_caught_everywhere(tmp_path: Path, where: str) -> None:
    write_dataset(tmp_path)
    shard = tmp_path / "shard-000001.tar"
    payload, header = _member_offsets(shard)
    flip_byte(shard, payload if where == "png_payload" else header)

    problems = shards.verify(tmp_path)
    assert problems and {p.shard for p in problems} == {"shard-000001.tar"}
    with pytest.raises(shards.ShardError, match=r"shard-000001\.tar"):
        shards.check_shard(shard, shards.read_manifest(tmp_path)["shards"][1])
    with pytest.raises(shards.ShardError, match=r"shard-000001\.tar.*sha256 mismatch"):
        shards.load_arrays(tmp_path, progress=False)
    with pytest.raises(shards.ShardError, match=r"shard-000001\.tar"):
        list(shards.stream(tmp_path, shuffle=0))
    with pytest.raises(shards.ShardError, match=r"shard-000001\.tar"):
        list(shards.stream(tmp_path, shuffle=3, seed=2))
    if where == "tar_header":
        # Even without checksums a damaged header is an error, not a shorter shard.
        with pytest.raises(shards.ShardError, match=r"shard-000001\.tar"):
            shards.load_arrays(tmp_path, verify=False, progress=False)
        with pytest.raises(shards.ShardError, match=r"shard-000001\.tar"):
            list(shards.stream(tmp_path, shuffle=0, checksum=False))


# ------------------------------------------------------------------------------------------- remote


@pytest.fixture()
def http_root(tmp_path: Path):
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # the base class's signature
        pass


def test_read_over_http_and_file_urls(http_root) -> None:
    root, base = http_root
    written = write_dataset(root / "ds")
    for location in (f"{base}/ds", f"{base}/ds/manifest.json", (root / "ds").as_uri()):
        arrays = shards.load_arrays(location, progress=False)
        assert arrays.keys == [s.key for s in written]
        assert np.array_equal(arrays.images, np.stack([s.image for s in written]))
        assert len(list(shards.stream(location, shuffle=0))) == 11
        assert shards.verify(location) == []
    flip_byte(root / "ds" / "shard-000002.tar", 700)
    with pytest.raises(shards.ShardError, match=r"shard-000002\.tar"):
        list(shards.stream(f"{base}/ds", shuffle=0))
    with pytest.raises(shards.ShardError, match=r"missing/manifest\.json.*404"):
        shards.read_manifest(f"{base}/missing")
    os.remove(root / "ds" / "shard-000000.tar")
    with pytest.raises(shards.ShardError, match=r"shard-000000\.tar"):
        shards.load_arrays(f"{base}/ds", progress=False)

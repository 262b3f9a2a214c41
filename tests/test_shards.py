"""Tests of the dataset contract (shards/): round trip, determinism, crash safety, refusal, verification."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import shards
from shards import writer as writer_module
from shards.format import encode_npy, encode_png

NUM_CLASSES = 5
IDENTITY = {"method": "toy", "teacher_sha256": "ab" * 32, "config": {"lr": 0.1, "steps": 3}}
HEADER = {"method": {"name": "toy", "seed": 0}, "teacher": {"arch": "lenet5", "class_names": list("abcde")}}
REPO = Path(__file__).resolve().parents[1]


def make_samples(start: int, count: int, shape: tuple[int, int, int] = (8, 8, 3)) -> list[shards.Sample]:
    """Samples whose content depends only on their global index, so a resumed run makes the same ones."""
    out = []
    for index in range(start, start + count):
        rng = np.random.default_rng(index)
        out.append(shards.Sample(
            key=f"{index:09d}",
            image=rng.integers(0, 256, size=shape, dtype=np.uint8),
            label=int(rng.integers(NUM_CLASSES)),
            logits=(rng.normal(size=NUM_CLASSES) * 3).astype(np.float16),
            meta={"source": "synthetic", "stage": index % 2},
        ))
    return out


def write_dataset(out: Path, sizes: tuple[int, ...] = (4, 4, 3), shape: tuple[int, int, int] = (8, 8, 3),
                  finish: bool = True) -> list[shards.Sample]:
    writer = shards.ShardWriter.open(out, identity=IDENTITY, header=HEADER, target_samples=sum(sizes),
                                     shard_size=max(sizes))
    written: list[shards.Sample] = []
    for size in sizes:
        batch = make_samples(len(written), size, shape)
        writer.commit_shard(batch)
        written += batch
    if finish:
        writer.finish({"diversity": 0.25})
    return written


def dir_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def expected_stats(samples: list[shards.Sample]) -> tuple[float, float]:
    logits = np.stack([s.logits for s in samples]).astype(np.float64)
    labels = np.array([s.label for s in samples])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    entropy = -(p * np.log(p)).sum(1)
    return float((np.stack([s.logits for s in samples]).argmax(1) == labels).mean()), float(entropy.mean())


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


# ------------------------------------------------------------------------------------------- crash safety


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so no cleanup code of the writer runs."""


def test_kill_between_shard_rename_and_manifest_resumes_cleanly(tmp_path: Path, monkeypatch) -> None:
    writer = shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=11, shard_size=4)
    writer.commit_shard(make_samples(0, 4))

    def killed(*args, **kwargs):
        raise Killed()
    with monkeypatch.context() as patch:
        patch.setattr(writer_module, "_write_json_atomic", killed)
        with pytest.raises(Killed):
            writer.commit_shard(make_samples(4, 4))
    assert (tmp_path / "shard-000001.tar").exists()  # the orphan a kill leaves behind
    assert shards.read_manifest(tmp_path)["num_samples"] == 4
    assert shards.verify(tmp_path) == []  # readers see only the committed shard
    (tmp_path / "shard-000002.tar.tmp").write_bytes(b"half a shard")
    (tmp_path / "manifest.json.tmp").write_bytes(b"{")

    resumed = shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=11, shard_size=4)
    assert resumed.num_committed == 4 and resumed.num_shards == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-000000.tar"]
    resumed.commit_shard(make_samples(4, 4))
    resumed.commit_shard(make_samples(8, 3))
    resumed.finish()
    arrays = shards.load_arrays(tmp_path, progress=False)
    assert arrays.keys == [f"{i:09d}" for i in range(11)]
    assert shards.verify(tmp_path) == []
    write_dataset(tmp_path / "reference")
    for i in range(3):
        name = f"shard-{i:06d}.tar"
        assert (tmp_path / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


_CHILD = textwrap.dedent("""
    import sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    import shards, test_shards as t
    w = shards.ShardWriter.open({out!r}, identity=t.IDENTITY, header=t.HEADER, target_samples=400, shard_size=2)
    while w.num_committed < 400:
        w.commit_shard(t.make_samples(w.num_committed, 2))
    w.finish()
""")


def test_sigkill_at_random_moments_never_corrupts(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    script = _CHILD.format(repo=str(REPO), tests=str(Path(__file__).parent), out=str(out))
    rng = np.random.default_rng(0)
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(0.5 + float(rng.uniform(0, 0.4)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        if (out / "manifest.json").exists():
            assert shards.verify(out) == []  # what a killed run leaves is a valid dataset
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    manifest = shards.read_manifest(out)
    assert manifest["complete"] and manifest["num_samples"] == 400
    assert shards.verify(out) == []
    arrays = shards.load_arrays(out, progress=False)
    assert arrays.keys == [f"{i:09d}" for i in range(400)]
    expected = make_samples(0, 400)
    assert np.array_equal(arrays.images, np.stack([s.image for s in expected]))


def test_disk_full_leaves_previous_state_untouched(tmp_path: Path, monkeypatch) -> None:
    writer = shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=8, shard_size=4)
    writer.commit_shard(make_samples(0, 4))
    before = dir_digest(tmp_path)

    def full(self, data):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(writer_module._HashingWriter, "write", full)
        with pytest.raises(shards.ShardError, match=r"shard-000001\.tar.*No space left"):
            writer.commit_shard(make_samples(4, 4))
    assert dir_digest(tmp_path) == before

    def manifest_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(writer_module, "_write_json_atomic", manifest_full)
        with pytest.raises(shards.ShardError, match=r"shard-000001\.tar.*withdrawn"):
            writer.commit_shard(make_samples(4, 4))
    assert dir_digest(tmp_path) == before
    writer.commit_shard(make_samples(4, 4))  # the writer is still usable once space is back
    assert writer.num_committed == 8 and shards.verify(tmp_path) == []


def test_invalid_samples_are_refused_before_writing(tmp_path: Path) -> None:
    writer = shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=8, shard_size=4)
    writer.commit_shard(make_samples(0, 2))
    before = dir_digest(tmp_path)
    bad_key = make_samples(3, 2)  # skips index 2
    wrong_dtype = make_samples(2, 1)
    wrong_dtype[0].image = wrong_dtype[0].image.astype(np.float32)
    wrong_shape = make_samples(2, 1, shape=(4, 4, 3))
    bad_label = make_samples(2, 1)
    bad_label[0].label = NUM_CLASSES
    overflow = make_samples(2, 1)
    overflow[0].logits = np.full(NUM_CLASSES, 1e6, dtype=np.float32)
    for samples, pattern in ((bad_key, "next global index '000000002'"), (wrong_dtype, "uint8"),
                             (wrong_shape, "differs"), (bad_label, "label"), (overflow, "float16"),
                             (make_samples(2, 5), "shard_size"), ([], "non-empty")):
        with pytest.raises(shards.ShardError, match=pattern):
            writer.commit_shard(samples)
    assert dir_digest(tmp_path) == before


def test_target_can_grow_and_resume_extends(tmp_path: Path) -> None:
    write_dataset(tmp_path, sizes=(4, 2))
    again = shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=6, shard_size=4)
    assert again.complete and again.remaining == 0
    with pytest.raises(shards.ShardError, match="exceed target_samples"):
        again.commit_shard(make_samples(6, 1))
    grown = shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=9, shard_size=4)
    assert not grown.complete and grown.num_committed == 6 and grown.remaining == 3
    grown.commit_shard(make_samples(6, 3))
    assert grown.finish()["num_samples"] == 9 and shards.verify(tmp_path) == []


def test_resume_state_round_trip(tmp_path: Path) -> None:
    import torch

    writer = shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=12, shard_size=4)
    assert writer.load_resume_state() is None
    writer.commit_shard(make_samples(0, 4), state={"step": 1, "weights": torch.arange(3.0)})
    writer.commit_shard(make_samples(4, 4), state={"step": 2, "weights": torch.arange(4.0), "rng": [1, 2]})
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["state-000001.pt"]
    state = shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=12,
                                    shard_size=4).load_resume_state()
    assert state["step"] == 2 and torch.equal(state["weights"], torch.arange(4.0)) and state["rng"] == [1, 2]

    before = dir_digest(tmp_path)
    with pytest.raises(shards.ShardError, match="weights_only"):
        writer.commit_shard(make_samples(8, 4), state={"object": Killed()})
    assert dir_digest(tmp_path) == before
    writer.commit_shard(make_samples(8, 4), state=None)  # the last shard clears the state
    assert writer.load_resume_state() is None and not list((tmp_path / "resume").iterdir())
    writer.finish()
    assert not (tmp_path / "resume").exists()


def test_artifacts_are_stored_and_checked(tmp_path: Path) -> None:
    writer = shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=4, shard_size=4)
    source = tmp_path.parent / f"{tmp_path.name}-prior.bin"
    source.write_bytes(b"prior weights")
    entry = writer.add_file("prior.pt", source)
    writer.add_file("notes.json", b"{}")
    writer.commit_shard(make_samples(0, 4))
    manifest = writer.finish()
    assert manifest["artifacts"]["prior.pt"] == entry and entry["url"] == "prior.pt"
    assert shards.read_artifact(tmp_path, "prior.pt") == b"prior weights"
    with pytest.raises(shards.ShardError, match="plain file name"):
        writer.add_file("../escape", b"x")
    (tmp_path / "prior.pt").write_bytes(b"tampered")
    assert [p.shard for p in shards.verify(tmp_path)] == ["prior.pt"]


# ------------------------------------------------------------------------------------------- refusals


def test_identity_mismatch_refuses_and_changes_nothing(tmp_path: Path) -> None:
    write_dataset(tmp_path, finish=False)
    # Leftovers that a matching open would clean up must survive a refused one.
    (tmp_path / "shard-000009.tar").write_bytes(b"orphan")
    (tmp_path / "shard-000003.tar.tmp").write_bytes(b"tmp")
    before = dir_digest(tmp_path)
    other = {**IDENTITY, "method": "other", "config": {"lr": 0.2, "steps": 3}}
    with pytest.raises(shards.ShardError) as error:
        shards.ShardWriter.open(tmp_path, identity=other, header=HEADER, target_samples=11, shard_size=4)
    message = str(error.value)
    assert "nothing was changed" in message
    assert '"toy"' in message and '"other"' in message and "config.lr" in message and "0.1" in message
    assert "steps" not in message
    assert dir_digest(tmp_path) == before


def test_foreign_directory_is_refused_but_own_leftovers_are_not(tmp_path: Path) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(shards.ShardError, match="is not empty and holds no dataset manifest"):
        shards.ShardWriter.open(foreign, identity=IDENTITY, header=HEADER, target_samples=4, shard_size=4)
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]

    killed_early = tmp_path / "early"
    killed_early.mkdir()
    (killed_early / "manifest.json.tmp").write_bytes(b"{")
    (killed_early / "shard-000000.tar.tmp").write_bytes(b"")
    writer = shards.ShardWriter.open(killed_early, identity=IDENTITY, header=HEADER, target_samples=4,
                                     shard_size=4)
    assert writer.num_committed == 0 and [p.name for p in killed_early.iterdir()] == ["manifest.json"]


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

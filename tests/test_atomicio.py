"""atomicio: the one atomic-write helper (tmp + fsync + rename + fsync(dir), cleanup on any failure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import atomicio

REPO = Path(__file__).resolve().parents[1]


class Boom(BaseException):
    """Not an Exception: cleanup must run for KeyboardInterrupt-like errors too."""


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_write_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    atomicio.write_atomic(target, b"new bytes")
    assert target.read_bytes() == b"new bytes"
    atomicio.write_atomic(target, "text é")
    assert target.read_bytes() == "text é".encode()
    atomicio.write_atomic(str(tmp_path / "fresh.bin"), bytearray(b"\x00\x01"))
    assert (tmp_path / "fresh.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "fresh.bin"]


@pytest.mark.parametrize("error", [Boom, OSError, ValueError])
def test_failing_writer_keeps_old_bytes_and_leaves_no_temporary(tmp_path: Path, error: type[BaseException]) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"old weights")

    def half_then_fail(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(b"half a fi")
        raise error("killed midway")

    with pytest.raises(error, match="killed midway"):
        atomicio.write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_failing_rename_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "inside").write_bytes(b"x")
    with pytest.raises(OSError):
        atomicio.write_atomic(target, b"cannot replace a non-empty directory")
    assert tree(tmp_path) == {"occupied": None, "occupied/inside": b"x"}


def test_callable_writer_file_is_fsynced_and_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "ckpt.pt"
    target.parent.mkdir()
    target.write_bytes(b"previous")
    synced: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(atomicio.os, "fsync", recording_fsync)
    seen: list[Path] = []

    def writer(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp != target and tmp.parent == target.parent and not tmp.exists()
        tmp.write_bytes(b"checkpoint bytes")

    atomicio.write_atomic(target, writer)
    assert target.read_bytes() == b"checkpoint bytes"
    assert not seen[0].exists()
    # The renamed file keeps its inode: the file the callable wrote was fsynced, and so was the directory.
    assert target.stat().st_ino in synced
    assert target.parent.stat().st_ino in synced


def test_other_directories_are_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "target_dir"
    sibling = tmp_path / "sibling"
    here.mkdir()
    sibling.mkdir()
    (sibling / "keep.txt").write_bytes(b"keep")
    (here / "other.txt").write_bytes(b"other")
    monkeypatch.chdir(sibling)  # a temporary in the working directory would show up here
    before = tree(tmp_path)

    def killed(tmp: Path) -> None:
        tmp.write_bytes(b"{")
        raise Boom()

    atomicio.write_atomic(here / "new.json", b"{}")
    with pytest.raises(Boom):
        atomicio.write_atomic(here / "new.json", killed)

    after = tree(tmp_path)
    assert after.pop("target_dir/new.json") == b"{}"
    assert after == before


def test_write_json_atomic(tmp_path: Path) -> None:
    target = tmp_path / "card.json"
    value = {"b": [1, 2.5], "a": "é"}
    atomicio.write_json_atomic(target, value, indent=2)
    assert target.read_bytes() == (json.dumps(value, indent=2) + "\n").encode("utf-8")
    with pytest.raises(ValueError):
        atomicio.write_json_atomic(target, {"x": float("nan")}, allow_nan=False)
    assert json.loads(target.read_text(encoding="utf-8")) == value
    assert [p.name for p in tmp_path.iterdir()] == ["card.json"]


def test_temp_path_and_fsync_dir(tmp_path: Path) -> None:
    first, second = atomicio.temp_path(tmp_path / "m.json"), atomicio.temp_path(tmp_path / "m.json")
    assert first != second and first.parent == tmp_path and first.name.startswith("m.json.")
    assert first.name.endswith(atomicio.TMP_SUFFIX) and atomicio.temp_owner(first.name) == os.getpid()
    assert atomicio.temp_owner("m.json.tmp") is None
    atomicio.fsync_dir(tmp_path)
    atomicio.fsync_dir(tmp_path / "does-not-exist")  # best effort: no error


def test_import_is_stdlib_only() -> None:
    code = "import sys, atomicio; bad = {'torch', 'numpy'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_the_same_checkpoint_saved_twice_has_the_same_bytes(tmp_path):
    # torch.save to a path records the path's name in the archive; the temporary's name holds pid and token,
    # so a student.pt or teacher saved through it differed from run to run.
    import hashlib

    import torch

    import zoo

    torch.manual_seed(0)
    classifier = zoo.Classifier(zoo.build_model("resnet8", 10, 3), (0.5,) * 3, (0.25,) * 3)
    digests = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        zoo.save_classifier(classifier, tmp_path / folder / "model.pt", arch="resnet8", num_classes=10,
                            in_channels=3, input_size=32)
        digests.append(hashlib.sha256((tmp_path / folder / "model.pt").read_bytes()).hexdigest())
    assert digests[0] == digests[1]

"""Tests of the dataset contract's write side (shards/): crash safety, resume, artifacts, refusals."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from shardkit import HEADER, IDENTITY, NUM_CLASSES, REPO, dir_digest, make_samples, write_dataset

import shards
from shards import writer as writer_module
from shards.format import LOCK_NAME
from shards.tario import HashingWriter

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
    writer.close()  # a killed process's lock goes with it
    assert (tmp_path / "shard-000001.tar").exists()  # the orphan a kill leaves behind
    assert shards.read_manifest(tmp_path)["num_samples"] == 4
    assert shards.verify(tmp_path) == []  # readers see only the committed shard
    (tmp_path / "shard-000002.tar.tmp").write_bytes(b"half a shard")
    (tmp_path / "manifest.json.tmp").write_bytes(b"{")

    resumed = shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=11, shard_size=4)
    assert resumed.num_committed == 4 and resumed.num_shards == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != LOCK_NAME) == ["manifest.json", "shard-000000.tar"]
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
    import shards, shardkit as t
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
        patch.setattr(HashingWriter, "write", full)
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


def test_disk_full_while_saving_set_up_progress_keeps_the_last_saved(tmp_path: Path, monkeypatch) -> None:
    writer = shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=8, shard_size=4)
    writer.save_prepare_state({"done": 1}, seconds=300.0)
    before = dir_digest(tmp_path)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    for target in ("write_atomic", "_write_json_atomic"):  # the state file, then the manifest naming it
        with monkeypatch.context() as patch:
            patch.setattr(writer_module, target, full)
            with pytest.raises(shards.ShardError, match="No space left"):
                writer.save_prepare_state({"done": 2}, seconds=600.0)
        assert dir_digest(tmp_path) == before
    assert writer.load_prepare_state() == {"done": 1} and writer.prepare_seconds == 300.0
    writer.save_prepare_state({"done": 2}, seconds=600.0)  # and the next save works once space is back
    assert writer.load_prepare_state() == {"done": 2}


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
    again.close()
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
    writer.close()
    writer = shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=12, shard_size=4)
    state = writer.load_resume_state()
    assert state["step"] == 2 and torch.equal(state["weights"], torch.arange(4.0)) and state["rng"] == [1, 2]

    before = dir_digest(tmp_path)
    with pytest.raises(shards.ShardError, match="weights_only"):
        writer.commit_shard(make_samples(8, 4), state={"object": Killed()})
    assert dir_digest(tmp_path) == before
    writer.commit_shard(make_samples(8, 4), state=None)  # the last shard clears the state
    assert writer.load_resume_state() is None and not list((tmp_path / "resume").iterdir())
    writer.finish()
    assert not (tmp_path / "resume").exists()


def test_set_up_progress_is_kept_across_a_kill_and_dropped_by_the_first_shard(tmp_path: Path) -> None:
    import torch

    writer = shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=8, shard_size=4)
    assert writer.load_prepare_state() is None and writer.prepare_seconds == 0
    writer.save_prepare_state({"done": 1}, seconds=2.0)
    writer.save_prepare_state({"done": 2, "weights": torch.arange(3.0)}, seconds=5.5)
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["prepare-000001.pt"]
    before = dir_digest(tmp_path)
    with pytest.raises(shards.ShardError, match="weights_only"):
        writer.save_prepare_state({"object": Killed()}, seconds=6.0)
    assert dir_digest(tmp_path) == before
    writer.close()
    # What a kill leaves: a stale progress file and a temporary of the next one. Reopening keeps only the listed one.
    (tmp_path / "resume" / "prepare-000000.pt").write_bytes(b"stale")
    (tmp_path / "resume" / "prepare-000002.pt.123.abc.tmp").write_bytes(b"half")
    writer = shards.ShardWriter.open(tmp_path, identity=IDENTITY, header=HEADER, target_samples=8, shard_size=4)
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["prepare-000001.pt"]
    state = writer.load_prepare_state()
    assert state["done"] == 2 and torch.equal(state["weights"], torch.arange(3.0)) and writer.prepare_seconds == 5.5

    writer.commit_shard(make_samples(0, 4), state={"step": 1})  # the set-up is over
    assert writer.load_prepare_state() is None and writer.prepare_seconds == 0
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["state-000000.pt"]
    writer.commit_shard(make_samples(4, 4))
    writer.finish()
    assert "prepare_state" not in writer.manifest and not (tmp_path / "resume").exists()


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

    # Before its first manifest a writer has made nothing but the manifest's temporary (and its lock file).
    killed_early = tmp_path / "early"
    killed_early.mkdir()
    (killed_early / "manifest.json.tmp").write_bytes(b"{")
    (killed_early / "manifest.json.4242.5ac1.tmp").write_bytes(b"{")
    (killed_early / LOCK_NAME).write_bytes(b"pid=4242 on elsewhere since then")
    writer = shards.ShardWriter.open(killed_early, identity=IDENTITY, header=HEADER, target_samples=4,
                                     shard_size=4)
    assert writer.num_committed == 0 and sorted(p.name for p in killed_early.iterdir()) == [LOCK_NAME,
                                                                                            "manifest.json"]
    writer.close()
    assert [p.name for p in killed_early.iterdir()] == ["manifest.json"]



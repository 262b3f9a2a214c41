"""Fan-out synthesis (torchrun or --rank/--world) and ``synth merge``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from synthkit import digest, refused, synth, tiny_gmi

import shards
from shards import writer as writer_module
from synth.commands.cli import main

TINY = tiny_gmi(batch_size=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: torch on one thread here



@pytest.fixture(scope="module")
def fanned(tmp_path_factory, tiny_teacher) -> Path:
    """7 images made by 2 workers under torchrun (gloo-free: the workers never talk to each other)."""
    out = tmp_path_factory.mktemp("fan") / "set"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "synth", "run", "gmi", "--out", str(out), "--teacher", str(tiny_teacher),
                           "--num-images", "7", *TINY], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_torchrun_workers_write_disjoint_parts_that_merge_and_verify(fanned, tmp_path):
    parts = [json.loads((fanned / f"part-{r:05d}" / "manifest.json").read_text()) for r in (0, 1)]
    assert [p["num_samples"] for p in parts] == [4, 3] and all(p["complete"] for p in parts)
    assert [p["identity"]["fanout"] for p in parts] == [
        {"rank": r, "world": 2, "base_seed": 0, "base_num_images": 7} for r in (0, 1)]
    assert parts[0]["identity"]["seed"] != parts[1]["identity"]["seed"]  # own seeds
    keys = [shards.load_arrays(fanned / f"part-{r:05d}", progress=False).keys for r in (0, 1)]
    assert keys == [[f"{i:09d}" for i in range(4)], [f"{i:09d}" for i in range(4, 7)]]

    merged = tmp_path / "merged"
    output = synth("merge", str(fanned / "part-00000"), str(fanned / "part-00001"), "--out", str(merged), "--link")
    assert "7 samples in 4 shards from 2 datasets (hardlink)" in output
    assert synth("verify", str(merged)).startswith(f"OK {merged}: 7 samples in 4 shards verified")
    manifest = json.loads((merged / "manifest.json").read_text())
    sources = [fanned / "part-00000" / "shard-000000.tar", fanned / "part-00000" / "shard-000001.tar",
               fanned / "part-00001" / "shard-000000.tar", fanned / "part-00001" / "shard-000001.tar"]
    for i, source in enumerate(sources):  # linked, not copied: the same inode, no new bytes on disk
        target = merged / f"shard-{i:06d}.tar"
        assert os.stat(target).st_ino == os.stat(source).st_ino and os.stat(source).st_nlink == 2
    arrays = shards.load_arrays(merged, progress=False)
    assert arrays.keys == [f"{i:09d}" for i in range(7)]
    for r in range(2):  # each part's images, labels and logits, unchanged
        mine = shards.load_arrays(fanned / f"part-{r:05d}", progress=False)
        rows = [arrays.keys.index(k) for k in mine.keys]
        assert np.array_equal(arrays.images[rows], mine.images) and np.array_equal(arrays.logits[rows], mine.logits)
    assert manifest["class_counts"] == np.bincount(arrays.labels, minlength=10).tolist()
    predicted = arrays.logits.astype(np.float32).argmax(1)
    assert manifest["summary"]["teacher_agreement"] == pytest.approx(float((predicted == arrays.labels).mean()))
    # Lineage: each source's method, config and command.
    lineage = manifest["lineage"]
    assert [entry["method"]["fanout"]["rank"] for entry in lineage] == [0, 1]
    assert [entry["method"]["config"]["batch_size"] for entry in lineage] == [4, 4]
    assert all("--num-images 7" in entry["commands"][0] for entry in lineage)
    card = (merged / "README.md").read_text()
    assert "Merged by `synth merge` from 2 datasets" in card and "synth merge" in card
    # The folder without --link: copies, the same bytes.
    copied = tmp_path / "copied"
    assert "(copy)" in synth("merge", str(fanned / "part-00000"), str(fanned / "part-00001"), "--out", str(copied))
    assert [e["sha256"] for e in json.loads((copied / "manifest.json").read_text())["shards"]] == \
        [e["sha256"] for e in manifest["shards"]]
    assert os.stat(copied / "shard-000000.tar").st_ino != os.stat(sources[0]).st_ino


def test_a_killed_worker_resumes_its_own_part_only(tmp_path, tiny_teacher, monkeypatch):
    out = tmp_path / "set"
    base = ["run", "gmi", "--out", str(out), "--teacher", str(tiny_teacher), "--num-images", "8", "--world", "2",
            *TINY]
    synth(*base, "--rank", "0")
    part0 = digest(out / "part-00000")
    real_commit = writer_module.ShardWriter.commit_shard
    calls = []

    def dies_after_one_shard(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between its first and second shard
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(writer_module.ShardWriter, "commit_shard", dies_after_one_shard)
    CliRunner().invoke(main, [*base, "--rank", "1"])
    assert json.loads((out / "part-00001" / "manifest.json").read_text())["num_samples"] == 2
    monkeypatch.setattr(writer_module.ShardWriter, "commit_shard", real_commit)
    result = CliRunner().invoke(main, [*base, "--rank", "1"], catch_exceptions=False)
    assert "resuming after 2 stored samples" in result.output
    assert digest(out / "part-00000") == part0
    assert shards.verify(out / "part-00001") == []
    assert shards.load_arrays(out / "part-00001", progress=False).keys == [f"{i:09d}" for i in range(4, 8)]
    # Another partition of the same folder is refused, not mixed in.
    other_world = refused("run", "gmi", "--out", str(out), "--teacher", str(tiny_teacher), "--num-images", "8",
                          "--world", "3", "--rank", "1", *TINY)
    assert "fanout.world: 2 in the existing dataset, 3 now" in other_world


def test_merge_refuses_what_does_not_fit_and_changes_nothing(tmp_path, tiny_teacher, other_teacher, fanned):
    one, two, other = tmp_path / "one", tmp_path / "two", tmp_path / "other"
    plain = ["--num-images", "3", *TINY]
    synth("run", "gmi", "--out", str(one), "--teacher", str(tiny_teacher), *plain)
    synth("run", "deepinversion", "--out", str(two), "--teacher", str(tiny_teacher), "--num-images", "2",
          "--batch-size", "2", "--iterations", "1", "--shard-size", "2", "--device", "cpu", "--quiet")
    synth("run", "gmi", "--out", str(other), "--teacher", str(other_teacher), *plain)
    out = tmp_path / "out"
    assert "teacher sha256" in refused("merge", str(one), str(other), "--out", str(out))
    assert "overlap" in refused("merge", str(one), str(two), "--out", str(out), "--link")
    assert not out.exists()
    (out / "keep").mkdir(parents=True)
    assert "not empty" in refused("merge", str(one), str(two), "--out", str(out))
    assert [p.name for p in out.iterdir()] == ["keep"]
    # Two ordinary runs (both keys from 0), two methods: renumbered copies, each method kept as lineage.
    united = tmp_path / "united"
    assert "(renumbered)" in synth("merge", str(one), str(two), "--out", str(united))
    assert shards.verify(united) == []
    arrays = shards.load_arrays(united, progress=False)
    assert arrays.keys == [f"{i:09d}" for i in range(5)]
    first, second = shards.load_arrays(one, progress=False), shards.load_arrays(two, progress=False)
    assert np.array_equal(np.sort(arrays.images.reshape(5, -1), 0),
                          np.sort(np.concatenate([first.images, second.images]).reshape(5, -1), 0))
    lineage = json.loads((united / "manifest.json").read_text())["lineage"]
    assert sorted(e["method"]["name"] for e in lineage) == ["deepinversion", "gmi"]
    card = (united / "README.md").read_text()
    assert "`deepinversion`" in card and "`gmi`" in card
    # An unfinished part is refused.
    manifest = json.loads((fanned / "part-00000" / "manifest.json").read_text())
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for entry in manifest["shards"]:
        (unfinished / entry["url"]).write_bytes((fanned / "part-00000" / entry["url"]).read_bytes())
    (unfinished / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    assert "incomplete" in refused("merge", str(unfinished), str(fanned / "part-00001"), "--out", str(out / "x"))


def test_merge_checks_every_source_shard_first_and_falls_back_to_symlinks(fanned, tmp_path, monkeypatch):
    from shards.merge import merge

    parts = [tmp_path / "a", tmp_path / "b"]
    for part, source in zip(parts, ("part-00000", "part-00001"), strict=True):
        part.mkdir()
        for path in (fanned / source).iterdir():
            if path.is_file():
                (part / path.name).write_bytes(path.read_bytes())
    shard = parts[1] / "shard-000001.tar"
    good = shard.read_bytes()
    shard.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    with pytest.raises(shards.ShardError, match=r"shard-000001\.tar .*sha256 mismatch"):
        merge(parts, tmp_path / "out", link=True)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    shard.write_bytes(good)

    def no_hard_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_hard_links)
    manifest = merge(parts, tmp_path / "out", link=True)
    assert {e["placed"] for e in manifest["shards"]} == {"symlink"}
    assert os.readlink(tmp_path / "out" / "shard-000003.tar") == "../b/shard-000001.tar"
    assert shards.verify(tmp_path / "out") == []


def test_multi_resolution_parts_merge_with_their_size_counts(tmp_path, tiny_teacher):
    out = tmp_path / "kgen"
    base = ["run", "kgen", "--out", str(out), "--teacher", str(tiny_teacher), "--num-images", "16", "--world", "2",
            "--class-embedding", "centre", "--resolutions", "16,32", "--batch-sizes", "4,4", *TINY]
    for rank in ("0", "1"):
        synth(*base, "--rank", rank)
    merged = tmp_path / "merged"
    synth("merge", str(out / "part-00000"), str(out / "part-00001"), "--out", str(merged))
    manifest = json.loads((merged / "manifest.json").read_text())
    parts = [json.loads((out / f"part-0000{r}" / "manifest.json").read_text()) for r in (0, 1)]
    assert manifest["resolution_counts"] == {
        size: sum(p["resolution_counts"].get(size, 0) for p in parts) for size in ("16x16", "32x32")}
    assert sum(manifest["resolution_counts"].values()) == 16 and shards.verify(merged) == []
    small = shards.load_arrays(merged, progress=False, resolution=(16, 16))
    assert small.images.shape[1:] == (16, 16, 3) and len(small.keys) == manifest["resolution_counts"]["16x16"]

"""Untrusted input and concurrent use (issue 18): a stranger's checkpoint, dataset folder or manifest, and a second
writer on one folder. Each test reproduces one attack from the audit; the remote ones (size caps, the cache) are in
tests/test_untrusted_remote.py, the synth-level ones in tests/test_untrusted_synth.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from shardkit import (
    HEADER,
    IDENTITY,
    NUM_CLASSES,
    REPO,
    dir_digest,
    forge_dataset,
    make_samples,
    sample_members,
    write_dataset,
)
from torch import nn

import shards
import zoo
from shards.merge import merge


def open_writer(out: Path, target: int = 8, shard_size: int = 4, **kwargs) -> shards.ShardWriter:
    return shards.ShardWriter.open(out, identity=IDENTITY, header=HEADER, target_samples=target,
                                   shard_size=shard_size, **kwargs)


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def two_parts(root: Path) -> tuple[Path, Path]:
    """Two complete datasets with disjoint keys, as a fan-out makes them."""
    parts = []
    for index in range(2):
        out = root / f"part{index}"
        with open_writer(out, target=4, key_offset=4 * index) as writer:
            writer.commit_shard(make_samples(4 * index, 4))
            writer.finish()
        parts.append(out)
    return parts[0], parts[1]


# ---------------------------------------------------------------------------------------- 1: TorchScript


class _WritesAFile(nn.Module):
    """A teacher whose TorchScript ``forward`` maps ``path`` shared and writes to it: code a checkpoint carries."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.fc = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mapped = torch.from_file(self.path, True, 16, dtype=torch.uint8)
        mapped.fill_(65)
        return self.fc(x.mean(dim=(2, 3))) + mapped.sum().float() * 0


def test_torchscript_needs_an_explicit_opt_in_and_is_never_run_to_count_classes(tmp_path: Path) -> None:
    target = tmp_path / "written-by-the-checkpoint.bin"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_WritesAFile(str(target))).save(str(tmp_path / "teacher.pt"))
    normalisation = {"mean": (0.5,) * 3, "std": (0.25,) * 3}
    with pytest.raises(zoo.ZooError, match="trust-torchscript"):
        zoo.load_classifier(tmp_path / "teacher.pt", **normalisation)
    assert not target.exists()
    with pytest.warns(UserWarning, match="runs code"):
        teacher = zoo.load_classifier(tmp_path / "teacher.pt", trust_torchscript=True, **normalisation)
    assert not target.exists()  # loading alone runs no forward pass
    assert teacher.num_classes == 5 and teacher.card.in_channels == 3  # read from the weights' shapes


# ---------------------------------------------------------------------------------------- 2: deletion


def test_resume_never_deletes_through_a_symlinked_resume_folder(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    write_dataset(out)  # complete: re-running its command is "already complete, nothing to do"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep")
    (victim / "state-000009.pt").write_bytes(b"keep too")
    (out / "resume").symlink_to(victim, target_is_directory=True)
    with pytest.raises(shards.ShardError, match="symlink"):
        open_writer(out, target=11)
    assert sorted(p.name for p in victim.iterdir()) == ["notes.txt", "state-000009.pt"]


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_resume_state_outside_the_dataset_is_refused(tmp_path: Path, where: str) -> None:
    out = tmp_path / "ds"
    with open_writer(out) as writer:
        writer.commit_shard(make_samples(0, 4), state={"step": 1})
    victim = tmp_path / "victim_file.txt"
    victim.write_text("keep")
    pointer = "../victim_file.txt" if where == "relative" else str(victim)
    edit_manifest(out, lambda m: m.update(resume_state=pointer))
    with pytest.raises(shards.ShardError, match="resume_state"):
        writer = open_writer(out)
        writer.commit_shard(make_samples(4, 4), state={"step": 2})  # the commit deleted the previous state
    assert victim.read_text() == "keep"
    with pytest.raises(shards.ShardError, match="resume_state"):
        shards.read_manifest(out)


@pytest.mark.parametrize("entry", [{"url": "../victim_file.txt", "seconds": 1},
                                   {"url": "resume/state-000000.pt", "seconds": 1},
                                   {"url": "resume/prepare-000000.pt", "seconds": -5},
                                   {"url": "resume/prepare-000000.pt", "seconds": "1"}, "resume/prepare-000000.pt"])
def test_a_set_up_state_that_is_not_the_writers_own_is_refused(tmp_path: Path, entry) -> None:
    out = tmp_path / "ds"
    with open_writer(out) as writer:
        writer.save_prepare_state({"done": 1}, seconds=1.0)
    victim = tmp_path / "victim_file.txt"
    victim.write_text("keep")
    edit_manifest(out, lambda m: m.update(prepare_state=entry))
    before = dir_digest(out)
    with pytest.raises(shards.ShardError, match="prepare_state"):
        open_writer(out)
    assert victim.read_text() == "keep" and dir_digest(out) == before


def test_a_set_up_state_that_would_run_code_is_refused_unrun(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    with open_writer(out) as writer:
        writer.save_prepare_state({"done": 1}, seconds=1.0)
    marker = tmp_path / "ran"
    torch.save({"done": _RunsCode(marker)}, out / "resume" / "prepare-000000.pt")
    with open_writer(out) as writer, pytest.raises(shards.ShardError, match="cannot load the resume state"):
        writer.load_prepare_state()
    assert not marker.exists()


class _RunsCode:
    """Pickles into a call that creates ``marker``: what a hostile state file would do when unpickled fully."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_folder_of_foreign_shards_is_refused_untouched_by_writer_and_merge(tmp_path: Path) -> None:
    foreign = tmp_path / "webdataset-output"  # webdataset's ShardWriter names its shards like ours
    foreign.mkdir()
    for index in range(2):
        (foreign / f"shard-{index:06d}.tar").write_bytes(b"someone else's shard %d" % index)
    before = dir_digest(foreign)
    with pytest.raises(shards.ShardError, match="not empty"):
        open_writer(foreign)
    assert dir_digest(foreign) == before
    a, b = two_parts(tmp_path)
    with pytest.raises(shards.ShardError, match="not empty"):
        merge([a, b], foreign)
    assert dir_digest(foreign) == before


# ---------------------------------------------------------------------------------------- 4: the lock


def test_a_second_writer_on_one_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    first = open_writer(out)
    with pytest.raises(shards.ShardError, match=rf"locked.*pid {os.getpid()}"):
        open_writer(out)
    first.commit_shard(make_samples(0, 4))
    first.commit_shard(make_samples(4, 4))
    first.finish()
    first.close()
    assert shards.verify(out) == []
    open_writer(out).close()  # free again once the holder closed it


_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{repo!r}, {tests!r}]
    import shards, shardkit as t
    writer = shards.ShardWriter.open({out!r}, identity=t.IDENTITY, header=t.HEADER, target_samples=8, shard_size=4)
    print("holding", flush=True)
    time.sleep(120)
""")


def test_another_process_is_named_and_the_lock_of_a_dead_one_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    script = _HOLDER.format(repo=str(REPO), tests=str(Path(__file__).parent), out=str(out))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "holding"
        with pytest.raises(shards.ShardError, match=rf"pid {child.pid}"):
            open_writer(out)
    finally:
        child.kill()  # SIGKILL: its lock file stays behind, naming a dead process
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    with open_writer(out) as writer:
        writer.commit_shard(make_samples(0, 4))
    assert shards.read_manifest(out)["num_samples"] == 4


def test_a_second_merge_into_one_folder_is_refused_naming_the_holder(tmp_path: Path, monkeypatch) -> None:
    a, b = two_parts(tmp_path)
    out = tmp_path / "merged"
    raced: list[str] = []
    copy = shutil.copyfile

    def copy_while_another_merge_starts(src, dst, *args, **kwargs):
        if not raced:
            raced.append("the second merge ran")  # set first: the second merge copies through here too
            try:
                merge([a, b], out)
            except shards.ShardError as error:
                raced[0] = str(error)
        return copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copy_while_another_merge_starts)
    merge([a, b], out)
    assert f"pid {os.getpid()}" in raced[0]
    assert shards.verify(out) == []


# ---------------------------------------------------------------------------------------- 7: decoded size


def test_images_beyond_the_pixel_cap_are_refused_before_decoding(tmp_path: Path) -> None:
    blank = np.zeros((4000, 4000, 1), np.uint8)  # 16 M pixels, ~16 KB as a PNG
    members = [m for i in range(2) for m in sample_members(f"{i:09d}", blank, 0, np.zeros(NUM_CLASSES))]
    forge_dataset(tmp_path / "big", [members], shape=(4000, 4000, 1))
    with pytest.raises(shards.ShardError, match="pixels"):
        shards.load_arrays(tmp_path / "big", progress=False)
    assert [p.shard for p in shards.verify(tmp_path / "big")] == ["manifest.json"]
    raw = {"__key__": "000000000", "__url__": "shard-000000.tar", **{n.split(".", 1)[1]: d for n, d in members[:4]}}
    with pytest.raises(shards.ShardError, match="pixels"):
        shards.decode_sample(raw)  # no manifest to compare with: the cap alone applies
    with open_writer(tmp_path / "ours") as writer, pytest.raises(shards.ShardError, match="pixels"):
        writer.commit_shard([shards.Sample("000000000", blank, 0, np.zeros(NUM_CLASSES, np.float16))])


def test_verify_and_inspect_decode_one_sample_at_a_time(tmp_path: Path) -> None:
    with open_writer(tmp_path / "ds", target=48, shard_size=48) as writer:
        blank = np.zeros((512, 512, 3), np.uint8)  # 768 KiB decoded, a few hundred bytes stored
        writer.commit_shard([shards.Sample(f"{i:09d}", blank, i % NUM_CLASSES, np.zeros(NUM_CLASSES, np.float16))
                             for i in range(48)])
        writer.finish()
    looks = {"verify": (shards.verify, []), "summarize": (lambda ds: shards.summarize(ds)["num_samples"], 48),
             "iter_samples": (lambda ds: sum(1 for _ in shards.iter_samples(ds)), 48)}  # iter_samples: synth inspect
    for name, (look, expected) in looks.items():
        tracemalloc.start()
        try:
            result = look(tmp_path / "ds")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result == expected
        assert peak < 8 << 20, f"{name} held {peak >> 20} MiB; the whole shard decoded is 36 MiB"


# ---------------------------------------------------------------------------------------- 10: merge


def test_merge_refuses_a_hostile_source_before_copying_and_leaves_no_output(tmp_path: Path) -> None:
    good = tmp_path / "good"
    write_dataset(good)
    image, logits = np.zeros((8, 8, 3), np.uint8), np.zeros(NUM_CLASSES)
    members = [m for i in range(3) for m in sample_members(f"{i:09d}", image, 1, logits)]
    members += [(f"../../../../tmp/ESCAPE_000000001.{ext}", data)  # a traversal name, counted as a fourth sample
                for ext, data in (("cls", b"1"), ("logits.npy", members[2][1]), ("png", members[3][1]))]
    hostile = tmp_path / "hostile"
    forge_dataset(hostile, [members], first_index=False)
    out = tmp_path / "merged"
    with pytest.raises(shards.ShardError, match="hostile"):
        merge([good, hostile], out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "hostile"]  # no staging folder left either


# ---------------------------------------------------------------------------------------- 11: the smaller ones


def test_sample_keys_are_checked_without_first_index_and_while_streaming(tmp_path: Path) -> None:
    image, logits = np.zeros((8, 8, 3), np.uint8), np.zeros(NUM_CLASSES)
    block = [m for i in range(4) for m in sample_members(f"{i:09d}", image, 1, logits)]
    forge_dataset(tmp_path / "twice", [block, block], first_index=False)  # the same keys in two shards
    skipping = [m for i in (0, 1, 2, 7) for m in sample_members(f"{i:09d}", image, 1, logits)]
    forge_dataset(tmp_path / "skips", [skipping], first_index=False)
    for folder, shard in (("twice", "shard-000001.tar"), ("skips", "shard-000000.tar")):
        with pytest.raises(shards.ShardError, match=shard):
            shards.load_arrays(tmp_path / folder, progress=False)
        with pytest.raises(shards.ShardError, match=shard):
            list(shards.stream(tmp_path / folder, shuffle=0))
        assert shard in {p.shard for p in shards.verify(tmp_path / folder)}
    edit_manifest(tmp_path / "skips", lambda m: m["shards"][0].update(first_index="0"))
    with pytest.raises(shards.ShardError, match="first_index"):
        shards.read_manifest(tmp_path / "skips")


def test_malformed_class_counts_are_a_problem_not_a_traceback(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    edit_manifest(tmp_path, lambda m: m.update(class_counts=[str(c) for c in m["class_counts"]]))
    problems = shards.verify(tmp_path)
    assert [p.shard for p in problems] == ["manifest.json"] and "class_counts" in problems[0].message


@pytest.mark.parametrize("url", ["%2e%2e/%2e%2e/secret.tar", "shard-000000.tar?x=1", "shard-000000.tar#part",
                                 "sub/simplecache::shard-000000.tar"])
def test_manifest_paths_must_be_plain_relative_names(tmp_path: Path, url: str) -> None:
    write_dataset(tmp_path)
    good = (tmp_path / "manifest.json").read_text()
    for change in (lambda m: m["shards"][0].update(url=url),
                   lambda m: m["artifacts"].update(prior={"url": url, "bytes": 1, "sha256": "0" * 64})):
        edit_manifest(tmp_path, change)
        with pytest.raises(shards.ShardError, match="plain relative name"):
            shards.read_manifest(tmp_path)
        (tmp_path / "manifest.json").write_text(good)

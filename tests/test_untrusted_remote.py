"""Untrusted input from far away (issue 18): a server that sends more than the manifest declares, a corrupt or
half-written cache, two readers filling one cache, a manifest the server no longer has. Against a loopback HTTP
server the tests start (127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from loopback import serving
from shardkit import flip_byte, write_dataset

import atomicio
import shards
from shards import remote


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.01)


@pytest.fixture()
def server(tmp_path: Path):
    with serving(tmp_path / "www") as srv:
        yield srv


def test_a_server_that_sends_more_than_declared_is_cut_off_naming_the_shard(server, tmp_path: Path) -> None:
    write_dataset(server.root / "ds")
    server.padding["shard-000001.tar"] = 64 << 20  # the real shard, then 64 MiB of zeros
    url = f"{server.url}/ds"
    with pytest.raises(shards.ShardError, match=r"shard-000001\.tar.*more than the \d+ bytes"):
        shards.load_arrays(url, progress=False)
    cache = tmp_path / "cache"
    with pytest.raises(shards.ShardError, match=r"shard-000001\.tar.*more than the \d+ bytes"):
        list(shards.stream(url, shuffle=0, cache_dir=cache))
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    # Each reader hung up after bytes + 1: what the server got out is what the socket buffers held, not 64 MiB.
    assert server.sent["shard-000001.tar"] < 64 << 20


def test_a_corrupt_cached_shard_is_deleted_and_fetched_again(server, tmp_path: Path) -> None:
    written = write_dataset(server.root / "ds")
    url, cache = f"{server.url}/ds", tmp_path / "cache"
    shards.load_arrays(url, cache_dir=cache, progress=False)
    cached = sorted(cache.glob("*.tar"))
    assert len(cached) == 3
    expected = np.stack([s.image for s in written])
    for verify in (True, False):
        flip_byte(cached[0], 700)  # same size, other bytes
        with pytest.warns(UserWarning, match="no longer matches its sha256"):
            arrays = shards.load_arrays(url, cache_dir=cache, verify=verify, progress=False)
        assert np.array_equal(arrays.images, expected)
        assert hashlib.sha256(cached[0].read_bytes()).hexdigest() == cached[0].stem  # healed in place
    flip_byte(cached[0], 700)
    with pytest.warns(UserWarning, match="no longer matches its sha256"):
        assert len(list(shards.stream(url, shuffle=0, cache_dir=cache))) == len(written)
    assert hashlib.sha256(cached[0].read_bytes()).hexdigest() == cached[0].stem


def test_two_writers_of_one_file_never_share_a_temporary(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"

    def write_while_another_process_writes_it_too(tmp: Path) -> None:
        tmp.write_text("outer")
        atomicio.write_atomic(target, "inner")

    atomicio.write_atomic(target, write_while_another_process_writes_it_too)
    assert target.read_text() == "outer" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_readers_filling_one_fresh_cache_at_once_all_succeed(server, tmp_path: Path) -> None:
    write_dataset(server.root / "ds")
    url, rounds, errors = f"{server.url}/ds", 30, []
    barrier = threading.Barrier(3)

    def reader() -> None:
        for index in range(rounds):
            barrier.wait()  # every round a fresh cache, filled by all readers at once (torchrun's ranks)
            try:
                shards.read_manifest(url, cache_dir=tmp_path / f"cache{index}")
            except shards.ShardError as error:
                errors.append(str(error))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []


def test_temporaries_of_a_killed_download_are_removed_on_start(server, tmp_path: Path) -> None:
    write_dataset(server.root / "ds")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True, timeout=60)
    pid = int(dead.stdout)  # a process that has exited: whatever it left is nobody's
    cache = tmp_path / "cache"
    (cache / "manifests").mkdir(parents=True)
    stale = [cache / f"{'0' * 64}.tar.{pid}.5e1f.tmp", cache / "manifests" / f"{'1' * 64}.json.{pid}.77.tmp"]
    live = cache / f"{'2' * 64}.tar.{os.getpid()}.9a.tmp"  # a download in progress in a live process
    for path in [*stale, live]:
        path.write_bytes(b"half a download")
    shards.load_arrays(f"{server.url}/ds", cache_dir=cache, progress=False)
    assert [p.exists() for p in stale] == [False, False] and live.exists()


def test_a_manifest_the_server_no_longer_has_is_an_error_unless_offline(server, tmp_path: Path) -> None:
    write_dataset(server.root / "ds")
    url, cache = f"{server.url}/ds", tmp_path / "cache"
    assert shards.load_arrays(url, cache_dir=cache, progress=False).manifest["num_samples"] == 11
    (server.root / "ds" / "manifest.json").unlink()
    with pytest.raises(shards.ShardError, match=r"404.*--offline"):
        shards.read_manifest(url, cache_dir=cache)
    assert shards.read_manifest(url, cache_dir=cache, offline=True)["num_samples"] == 11
    for path in (server.root / "ds").iterdir():
        path.unlink()  # the cached shards are all offline reading needs
    assert len(shards.load_arrays(url, cache_dir=cache, offline=True, progress=False)) == 11

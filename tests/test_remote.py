"""Remote shards against a loopback HTTP server the tests start: same student as from the local folder, a cache
that reads every shard from the network once, retries after a dropped connection, and a clear error naming the
shard when the server keeps truncating it."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from loopback import serving

import shards
import zoo
from distill.cli import main as distill_main
from shards import remote

N, SHARD = 96, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: torch on one thread here


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.01)


@pytest.fixture()
def server(tmp_path):
    with serving(tmp_path / "www") as srv:  # a test may stop it early: shutdown() is idempotent
        yield srv


@pytest.fixture()
def dataset(server) -> Path:
    """N random images with a tiny teacher's logits, in N / SHARD shards, under the server's root."""
    torch.manual_seed(0)
    teacher = zoo.Classifier(zoo.build_model("resnet8", 10, 3), (0.5,) * 3, (0.25,) * 3).eval()
    images = np.random.default_rng(0).integers(0, 256, size=(N, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        logits = teacher(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    out = server.root / "set"
    writer = shards.ShardWriter.open(out, identity={"method": "test"}, header={"teacher": {"mean": [0.5] * 3,
                                                                                          "std": [0.25] * 3}},
                                     target_samples=N, shard_size=SHARD)
    for start in range(0, N, SHARD):
        writer.commit_shard([shards.Sample(f"{i:09d}", images[i], int(logits[i].argmax()),
                                           logits[i].astype(np.float16)) for i in range(start, start + SHARD)])
    writer.finish({})
    return out


def distill(shards_at: str, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    result = CliRunner().invoke(distill_main, [
        "run", "--shards", shards_at, "--student", "resnet8", "--batch-size", "32", "--epochs", "2",
        "--eval-data", "none", "--workers", "0", "--quiet", "--out", str(out), *extra])
    if result.exit_code != 0:
        raise AssertionError(result.output)
    return torch.load(out / "student.pt", map_location="cpu", weights_only=True)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_http_dataset_distills_to_the_same_student_and_the_cache_reads_each_shard_once(server, dataset, tmp_path):
    url, cache = f"{server.url}/set", tmp_path / "cache"
    total = sum(e["bytes"] for e in shards.read_manifest(dataset)["shards"])
    local = distill(str(dataset), tmp_path / "local", "--cache", "memory")
    remote_student = distill(url, tmp_path / "remote", "--cache", "memory", "--cache-dir", str(cache))
    assert same_weights(local, remote_student)
    assert server.shard_bytes() == total  # every shard read once, whole
    manifest = shards.read_manifest(dataset)
    assert sorted(p.name for p in cache.glob("*.tar")) == sorted(f"{e['sha256']}.tar" for e in manifest["shards"])

    # A second student, streaming for two epochs: no shard byte from the network, the same student as locally.
    streamed_local = distill(str(dataset), tmp_path / "local-stream", "--cache", "stream")
    streamed = distill(url, tmp_path / "remote-stream", "--cache", "stream", "--cache-dir", str(cache))
    assert server.shard_bytes() == total
    assert same_weights(streamed_local, streamed)

    # Streaming with an empty cache fills it during the first epoch; the second epoch reads from disk.
    fresh = tmp_path / "fresh-cache"
    assert same_weights(streamed_local, distill(url, tmp_path / "remote-stream-2", "--cache", "stream",
                                                "--cache-dir", str(fresh)))
    assert server.shard_bytes() == 2 * total
    assert len(list(fresh.glob("*.tar"))) == 3 and not list(fresh.glob("*.tmp"))

    # The server gone: the cache alone (manifest copy included) still trains the same student.
    server.shutdown()
    server.server_close()
    with pytest.warns(UserWarning, match="using the copy in --cache-dir"):
        offline = distill(url, tmp_path / "offline", "--cache", "memory", "--cache-dir", str(cache))
    assert same_weights(local, offline)


def test_a_dropped_connection_is_retried_and_gives_the_same_bytes(server, dataset, tmp_path):
    url = f"{server.url}/set"
    server.truncate = {f"shard-{i:06d}.tar": 1 for i in range(3)}  # every shard's first response is cut
    arrays = shards.load_arrays(url, progress=False)
    expected = shards.load_arrays(dataset, progress=False)
    assert np.array_equal(arrays.images, expected.images) and np.array_equal(arrays.logits, expected.logits)
    # Each shard: half of it, the connection drops, then all of it again (this server ignores Range).
    assert server.shard_bytes() == sum(e["bytes"] // 2 + e["bytes"] for e in shards.read_manifest(dataset)["shards"])
    server.truncate = {f"shard-{i:06d}.tar": 1 for i in range(3)}
    assert sum(1 for _ in shards.stream(url, shuffle=0)) == N


def test_a_server_that_keeps_truncating_a_shard_is_named(server, dataset, tmp_path):
    url, cache = f"{server.url}/set", tmp_path / "cache"
    entry = shards.read_manifest(dataset)["shards"][1]
    server.truncate = {"shard-000001.tar": float("inf")}
    for cache_mode in ("memory", "stream"):
        result = CliRunner().invoke(distill_main, [
            "run", "--shards", url, "--student", "resnet8", "--batch-size", "32", "--epochs", "1",
            "--eval-data", "none", "--workers", "0", "--quiet", "--cache", cache_mode, "--cache-dir", str(cache),
            "--out", str(tmp_path / cache_mode)])
        assert result.exit_code == 1, result.output
        assert f"shard shard-000001.tar ({url}/shard-000001.tar): the transfer broke off at byte " \
               f"{entry['bytes'] // 2} of {entry['bytes']} 4 times" in result.output
        assert "gave up after 3 retries" in result.output
    assert f"{entry['sha256']}.tar" not in {p.name for p in cache.iterdir()}  # no partial copy is ever cached
    assert not list(cache.glob("*.tmp"))
    assert not (tmp_path / "memory" / "student.pt").exists()


def test_remote_reader_resumes_with_range_requests(tmp_path):
    """A server that honours Range: the retry asks only for the missing bytes."""
    data = bytes(range(256)) * 64
    (tmp_path / "blob").write_bytes(data)
    ranges: list[str | None] = []

    class RangeHandler(http.server.BaseHTTPRequestHandler):
        cuts = 1

        def do_GET(self) -> None:  # noqa: N802
            header = self.headers.get("Range")
            ranges.append(header)
            start = int(header.split("=")[1].rstrip("-")) if header else 0
            body = data[start:]
            self.send_response(206 if header else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if RangeHandler.cuts:
                RangeHandler.cuts -= 1
                self.wfile.write(body[:1000])
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        reader = remote.RemoteReader(f"http://127.0.0.1:{srv.server_address[1]}/blob", "blob", len(data))
        got = b"".join(iter(lambda: reader.read(4096), b""))
    finally:
        srv.shutdown()
        srv.server_close()
    assert got == data and reader.reconnections == 1 and ranges == [None, "bytes=1000-"]


def test_fsspec_locations_read_and_cache_like_http(dataset, tmp_path):
    """Any fsspec URL (here its in-memory filesystem, standing in for s3:// or gs://) reads, verifies, caches."""
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    for path in dataset.iterdir():
        memory.pipe(f"/remote-set/{path.name}", path.read_bytes())
    cache = tmp_path / "cache"
    arrays = shards.load_arrays("memory://remote-set", progress=False, cache_dir=cache)
    expected = shards.load_arrays(dataset, progress=False)
    assert arrays.keys == expected.keys and np.array_equal(arrays.images, expected.images)
    assert len(list(cache.glob("*.tar"))) == 3
    memory.rm("/remote-set/shard-000002.tar")  # gone from the remote: the cache still has it
    assert sum(1 for _ in shards.stream("memory://remote-set", shuffle=0, cache_dir=cache)) == N
    memory.pipe("/remote-set/shard-000002.tar", b"not a shard")
    try:
        with pytest.raises(shards.ShardError, match=r"shard-000002\.tar"):
            list(shards.stream("memory://remote-set", shuffle=0))
    finally:
        memory.rm("/remote-set", recursive=True)  # the in-memory filesystem lives as long as the process


def test_a_withdrawn_manifest_stops_distill_unless_offline(server, dataset, tmp_path):
    url, cache = f"{server.url}/set", tmp_path / "cache"
    online = distill(url, tmp_path / "online", "--cache", "memory", "--cache-dir", str(cache))
    (dataset / "manifest.json").unlink()  # the server now answers 404: the set was withdrawn
    with pytest.raises(AssertionError, match="--offline"):
        distill(url, tmp_path / "refused", "--cache", "memory", "--cache-dir", str(cache))
    assert same_weights(online, distill(url, tmp_path / "offline", "--cache", "memory", "--cache-dir", str(cache),
                                        "--offline"))
    streamed = distill(url, tmp_path / "offline-stream", "--cache", "stream", "--cache-dir", str(cache), "--offline")
    assert streamed.keys() == online.keys()  # the streamed path reads the cached manifest too

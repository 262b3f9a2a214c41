"""Reading shards from far away: retries that resume where a dropped connection stopped, and a local cache.

- :class:`RemoteReader` reads a URL as a stream. When the connection fails or ends before the size the manifest
  records, it reconnects at the byte where it stopped (an HTTP ``Range`` request; a server that ignores it is
  read from the start and the bytes already seen are skipped), up to ``retries`` times without progress; then
  a :class:`ShardError` names the shard and the byte. A short epoch can never come from here, and neither can
  a long one: it never reads more than the declared size plus one byte, and that byte is an error naming the
  shard, so an endless response fills neither memory nor the cache's disk.
- :class:`ShardCache` (``--cache-dir``) keeps every remote shard that was read whole and matched its sha256
  under ``DIR/<sha256>.tar``: content-addressed, so a second epoch, a second student or another dataset that
  holds the same shard reads it from disk, and no byte of it from the network again. A shard is copied into
  the cache while it streams (no second download) and only renamed into place once complete and verified. A
  cached file is checked against its sha256 each time it is opened; one that no longer matches is deleted and
  fetched again. Temporaries carry their process's pid; a new cache removes those of dead processes.

Standard library only (fsspec is imported only for non-HTTP URLs); no torch.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from atomicio import TMP_SUFFIX, fsync_dir, remove_stale_temporaries, write_atomic

from .format import ShardError
from .tario import MeteredReader

#: Reconnections allowed without progress before a shard is declared unreadable.
RETRIES = 3
BACKOFF_SECONDS = 0.25
TIMEOUT_SECONDS = 60
_SKIP_CHUNK = 1 << 20


def _open_at(url: str, position: int) -> tuple[IO[bytes], int]:
    """A stream of ``url`` and the position it starts at (``position`` when the server honours it, else 0)."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme in ("http", "https"):
        request = urllib.request.Request(url, headers={"Range": f"bytes={position}-"} if position else {})
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)  # the scheme is checked above
        return response, position if response.status == 206 else 0
    try:
        import fsspec
    except ImportError as error:
        raise ShardError(f"{url}: reading {scheme}:// needs fsspec and its backend ({error})") from error
    try:
        handle = fsspec.open(url, "rb").open()
    except ValueError as error:  # fsspec: "Protocol not known"
        raise ShardError(f"{url}: fsspec cannot read {scheme}:// ({error})") from error
    if position:
        handle.seek(position)
    return handle, position


class RemoteReader:
    """A read-only stream of a remote shard that survives dropped connections (see the module docstring)."""

    def __init__(self, url: str, name: str, size: int | None, *, retries: int | None = None,
                 backoff: float | None = None):
        self.url, self.name, self.size = url, name, size
        self.retries = RETRIES if retries is None else retries
        self.backoff = BACKOFF_SECONDS if backoff is None else backoff
        self.position = 0
        self.reconnections = 0
        self._failed_at, self._stalls = -1, 0
        self._handle: IO[bytes] | None = None
        self._connect(first=True)

    def _connect(self, first: bool = False) -> None:
        while True:
            try:
                handle, start = _open_at(self.url, self.position)
                break
            except urllib.error.HTTPError as error:
                if first and error.code == 404:
                    raise FileNotFoundError(f"{self.url}: HTTP 404") from error
                if error.code < 500:  # the server's answer, not a network failure: retrying will not help
                    raise ShardError(f"shard {self.name}: cannot read {self.url} ({error})") from error
                self._stall(error)
            except ShardError:
                raise
            except (OSError, http.client.HTTPException) as error:
                self._stall(error)
        self._handle = handle
        while start < self.position:  # the server ignored the Range header: skip what was already read
            skipped = handle.read(min(_SKIP_CHUNK, self.position - start))
            if not skipped:
                self._stall(None)
                return self._reconnect()
            start += len(skipped)

    def _stall(self, error: BaseException | None) -> None:
        """Counts a failure at the current position; raises once ``retries`` in a row made no progress."""
        if self.position > self._failed_at:
            self._failed_at, self._stalls = self.position, 0
        self._stalls += 1
        if self._stalls > self.retries:
            of = f" of {self.size}" if self.size is not None else ""
            why = f"{type(error).__name__}: {error}" if error is not None else "the server closed the connection"
            raise ShardError(f"shard {self.name} ({self.url}): the transfer broke off at byte {self.position}{of} "
                             f"{self._stalls} times ({why}); gave up after {self.retries} retries")
        time.sleep(self.backoff * 2 ** (self._stalls - 1))

    def _reconnect(self) -> None:
        self.close()
        self.reconnections += 1
        self._connect()

    def read(self, n: int = -1) -> bytes:
        if self.size is not None:  # never ask for more than one byte past the declared size
            room = self.size + 1 - self.position
            n = room if n is None or n < 0 else min(n, room)
        while True:
            error: BaseException | None = None
            try:
                assert self._handle is not None
                data = self._handle.read() if n is None or n < 0 else self._handle.read(n)
            except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                data, error = b"", exc
            if data:
                self.position += len(data)
                if self.size is not None and self.position > self.size:
                    self.close()
                    raise ShardError(f"shard {self.name} ({self.url}): the server sends more than the {self.size} "
                                     f"bytes the manifest declares; stopped reading at byte {self.position}")
                return data
            if error is None and (self.size is None or self.position >= self.size):
                return b""  # the real end
            self._stall(error)
            self._reconnect()

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except Exception:  # closing a broken connection may fail too; nothing to keep from it
                pass
            self._handle = None

    def __enter__(self) -> RemoteReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _CachingReader:
    """Passes a remote shard through while writing it to a private temporary file in the cache; at the end of
    the stream, if size and sha256 match the manifest, the file is fsynced and renamed to its cache name."""

    def __init__(self, source: RemoteReader, final: Path, entry: dict[str, Any]):
        self.source, self.final, self.entry = source, final, entry
        # Unique per process: DDP ranks and loader workers may fetch the same shard at once.
        self.tmp = final.with_name(f"{final.name}.{os.getpid()}.{id(self):x}{TMP_SUFFIX}")
        self.handle: IO[bytes] | None = open(self.tmp, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        if self.handle is None:
            return data
        if data:
            self.handle.write(data)
            self.sha256.update(data)
            self.size += len(data)
        else:
            self._commit()
        return data

    def _commit(self) -> None:
        assert self.handle is not None
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.handle = None
        if self.size == self.entry["bytes"] and self.sha256.hexdigest() == self.entry["sha256"]:
            os.replace(self.tmp, self.final)
            fsync_dir(self.final.parent)
        else:  # the caller's own check reports the mismatch; a bad copy never enters the cache
            self.tmp.unlink(missing_ok=True)

    def close(self) -> None:
        self.source.close()
        if self.handle is not None:  # abandoned before the end: not a whole shard
            self.handle.close()
            self.handle = None
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> _CachingReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ShardCache:
    """``--cache-dir``: remote shards by sha256, each written once, whole and verified (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory).expanduser()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ShardError(f"--cache-dir {self.directory}: cannot create it ({error})") from error
        # What killed downloads left: their process is gone, so nobody will finish or remove them.
        remove_stale_temporaries(self.directory)
        remove_stale_temporaries(self.directory / "manifests")

    def _manifest_path(self, url: str) -> Path:
        return self.directory / "manifests" / f"{hashlib.sha256(url.encode()).hexdigest()}.json"

    def keep_manifest(self, url: str, raw: bytes) -> None:
        path = self._manifest_path(url)
        if not path.is_file() or path.read_bytes() != raw:
            path.parent.mkdir(exist_ok=True)
            write_atomic(path, raw)

    def cached_manifest(self, url: str) -> bytes | None:
        path = self._manifest_path(url)
        return path.read_bytes() if path.is_file() else None

    def path(self, entry: dict[str, Any]) -> Path:
        return self.directory / f"{entry['sha256']}.tar"

    def open(self, url: str, entry: dict[str, Any]) -> IO[bytes]:
        cached = self.path(entry)
        if cached.is_file():
            if _file_matches(cached, entry):
                return open(cached, "rb")  # the reader's own size/sha256 check still runs on these bytes
            # Changed on disk since it was cached (bit rot, a stray write): never used again, fetched once more.
            warnings.warn(f"--cache-dir: {cached} no longer matches its sha256; fetching shard {entry['url']} "
                          "again", stacklevel=2)
            cached.unlink(missing_ok=True)
        return _CachingReader(RemoteReader(url, entry["url"], entry["bytes"]), cached, entry)  # type: ignore[return-value]


# Cached files this process has hashed, by (path, inode, size, mtime): later epochs do not hash them again.
_MATCHED: set[tuple[str, int, int, int]] = set()


def _file_matches(path: Path, entry: dict[str, Any]) -> bool:
    """Whether the file at ``path`` has the manifest ``entry``'s size and sha256 (read through once)."""
    try:
        stat = path.stat()
        seen = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if stat.st_size != entry["bytes"]:
            return False
        if seen in _MATCHED:
            return True
        with open(path, "rb") as handle:
            reader = MeteredReader(handle, entry["url"], entry["bytes"])
            while reader.read(_SKIP_CHUNK):
                pass
    except (OSError, ShardError):
        return False
    if reader.matches(entry):
        _MATCHED.add(seen)
        return True
    return False


CacheDir = str | os.PathLike[str] | None


@contextmanager
def naming_the_shard(name: str, url: str) -> Iterator[None]:
    """Turns a failure to open or read shard ``name`` (at ``url``) into a :class:`ShardError` that names it."""
    try:
        yield
    except FileNotFoundError:
        raise ShardError(f"shard {name} is missing (expected at {url})") from None
    except ShardError:
        raise
    except OSError as error:
        raise ShardError(f"shard {name}: cannot read {url} ({error})") from error


def open_shard(url: str, entry: dict[str, Any], local: bool, cache_dir: CacheDir = None) -> IO[bytes]:
    """A readable stream of one shard: the local file, the cached copy, or the network (with retries)."""
    if local:
        return open(url, "rb")
    if cache_dir is not None:
        return ShardCache(cache_dir).open(url, entry)
    return RemoteReader(url, entry["url"], entry["bytes"])  # type: ignore[return-value]


def read_shard(url: str, entry: dict[str, Any], local: bool, cache_dir: CacheDir = None) -> bytes:
    """The bytes of one shard, never more than its declared size plus one (which raises ShardError)."""
    if local and os.path.getsize(url) != entry["bytes"]:  # a local file need not be read to know its size
        raise ShardError(f"shard {entry['url']} ({url}): size mismatch, manifest says {entry['bytes']} bytes, "
                         f"found {os.path.getsize(url)}")
    with open_shard(url, entry, local, cache_dir) as handle:  # type: ignore[attr-defined]
        reader = MeteredReader(handle, entry["url"], entry["bytes"], checksum=False)
        chunks = []
        while chunk := reader.read(_SKIP_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)

"""Where a dataset lives and how its files are opened: a local directory, a local ``manifest.json`` path, or a
URL to either (``file://``, ``http(s)://`` through the standard library, anything else such as ``s3://`` or
``gs://`` through fsspec and its backend package). Shard URLs in the manifest are relative to the manifest.

Shared by :mod:`shards.reader` and :mod:`shards.streaming`; imports neither (and no torch).
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO

from .format import MANIFEST_NAME, ShardError

Location = str | os.PathLike[str]


def is_url(location: Location) -> bool:
    return isinstance(location, str) and "://" in location


def file_url_to_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ShardError(f"{url}: file:// URLs must name a local path")
    return urllib.request.url2pathname(parsed.path)


def manifest_location(location: Location) -> tuple[str, str, bool]:
    """(manifest path or URL, base for shard URLs, is_local)."""
    if is_url(location):
        text = str(location)
        if text.startswith("file://"):
            return manifest_location(file_url_to_path(text))
        if urllib.parse.urlparse(text).path.endswith(".json"):
            return text, text.rsplit("/", 1)[0], False
        base = text.rstrip("/")
        return f"{base}/{MANIFEST_NAME}", base, False
    path = Path(location)
    if path.is_dir():
        return str(path / MANIFEST_NAME), str(path), True
    if path.suffix == ".json" or path.is_file():
        return str(path), str(path.parent), True
    raise ShardError(f"{path}: no such dataset directory or manifest")


def is_local_location(location: Location) -> bool:
    return manifest_location(location)[2]


def open_url(url: str) -> IO[bytes]:
    """A readable binary stream for a remote URL (http(s) by the standard library, the rest by fsspec)."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme in ("http", "https"):
        # urllib needs no extra package (fsspec's http needs aiohttp); 60 s covers a slow first byte.
        return urllib.request.urlopen(url, timeout=60)  # the scheme is checked above
    try:
        import fsspec

        return fsspec.open(url, "rb").open()
    except ImportError as error:
        raise ShardError(f"{url}: reading {scheme}:// needs an fsspec backend that is not installed "
                         f"({error}); e.g. pip install s3fs for s3://, gcsfs for gs://") from error
    except ValueError as error:  # fsspec: "Protocol not known"
        raise ShardError(f"{url}: fsspec cannot read {scheme}:// ({error})") from error


def open_location(url: str, local: bool) -> IO[bytes]:
    """A readable binary stream for a local path (``local``) or a URL."""
    return open(url, "rb") if local else open_url(url)


#: The largest manifest read (a manifest of 100k shards is ~30 MB): an endless response is not a manifest.
MAX_MANIFEST_BYTES = 64 << 20


def read_all(url: str, local: bool, limit: int) -> bytes:
    """The whole file at ``url``, which may hold at most ``limit`` bytes: one byte more is a ShardError,
    raised without reading further (a server that never stops sending cannot fill memory)."""
    chunks, size = [], 0
    with open_location(url, local) as handle:
        while size <= limit:  # in chunks: read(n) allocates n bytes up front, however small the file
            chunk = handle.read(min(1 << 20, limit + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
    raise ShardError(f"{url}: larger than the {limit} bytes expected here; not read further")

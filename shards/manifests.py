"""Reading a dataset's manifest and naming what it lists: the validated manifest (local, remote, or from the
cache), the shards' URLs, each shard's first key, and the artifacts stored beside them.

Shared by :mod:`shards.reader`, :mod:`shards.verify` and :mod:`shards.merge`; imports none of them (and no torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import warnings
from typing import Any

from .format import ShardError
from .locations import MAX_MANIFEST_BYTES, Location, manifest_location, read_all
from .remote import ShardCache
from .validation import shard_first_indices, validate_manifest


def read_manifest(location: Location, *, cache_dir: str | os.PathLike[str] | None = None,
                  offline: bool = False) -> dict[str, Any]:
    """The validated manifest of the dataset at ``location`` (dir, manifest path or URL); ShardError if unusable.

    With ``cache_dir`` a remote manifest is read from the network when it can be (so a changed dataset is
    seen) and kept in the cache; when the network fails, the cached copy is used (with a warning), so a
    cached dataset also trains offline. A server that answers that it has no manifest (HTTP 404/410) is an
    error: the dataset was withdrawn or moved, and its cached copy is used only with ``offline=True``, which
    reads the cached copy without asking the server at all."""
    where, _base, local = manifest_location(location)
    cache = ShardCache(cache_dir) if cache_dir is not None and not local else None
    if offline and not local:
        raw = cache.cached_manifest(where) if cache is not None else None
        if raw is None:
            raise ShardError(f"{where}: offline, and no copy of this manifest is cached"
                             + (f" in {cache_dir}" if cache_dir is not None else " (give the --cache-dir it was "
                                                                                 "read into)"))
    else:
        raw = _fetch_manifest(where, local, cache, cache_dir)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(f"{where}: not valid JSON ({error})") from None
    try:
        return validate_manifest(manifest, where)
    except (TypeError, ValueError, KeyError, AttributeError) as error:  # a shape validation did not foresee
        raise ShardError(f"{where}: not a usable dataset manifest ({type(error).__name__}: {error})") from None


def _fetch_manifest(where: str, local: bool, cache: ShardCache | None, cache_dir: Any) -> bytes:
    try:
        raw = read_all(where, local, MAX_MANIFEST_BYTES)
    except ShardError:
        raise
    except FileNotFoundError:
        raise ShardError(f"{where}: no dataset manifest here") from None
    except urllib.error.HTTPError as error:
        if error.code in (404, 410):
            cached = " (a copy is cached: --offline uses it)" if cache and cache.cached_manifest(where) else ""
            raise ShardError(f"{where}: no dataset manifest here (HTTP {error.code}){cached}; a cached copy "
                             "is used only with --offline") from None
        return _cached_instead(where, error, cache, cache_dir)
    except OSError as error:
        return _cached_instead(where, error, cache, cache_dir)
    if cache is not None:
        try:
            cache.keep_manifest(where, raw)
        except OSError as error:  # the manifest was read; a cache that cannot keep it costs only offline use
            warnings.warn(f"--cache-dir {cache_dir}: cannot keep the manifest of {where} ({error})", stacklevel=3)
    return raw


def _cached_instead(where: str, error: OSError, cache: ShardCache | None, cache_dir: Any) -> bytes:
    cached = cache.cached_manifest(where) if cache is not None else None
    if cached is None:
        raise ShardError(f"{where}: cannot read the dataset manifest ({error})") from error
    warnings.warn(f"{where}: cannot be read ({error}); using the copy in --cache-dir {cache_dir}", stacklevel=4)
    return cached


def shard_urls(location: Location, manifest: dict[str, Any] | None = None) -> list[str]:
    """The manifest's shards as local paths or absolute URLs, in manifest order."""
    manifest = read_manifest(location) if manifest is None else manifest
    _where, base, local = manifest_location(location)
    if local:
        return [os.path.join(base, entry["url"]) for entry in manifest["shards"]]
    return [f"{base}/{entry['url']}" for entry in manifest["shards"]]


def shard_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's shard entries, each with the first index its keys must start at (recorded or implied)."""
    return [{**entry, "first_index": first}
            for entry, first in zip(manifest["shards"], shard_first_indices(manifest), strict=True)]



def read_artifact(location: Location, name: str, *, manifest: dict[str, Any] | None = None) -> bytes:
    """The bytes of an artifact stored with :meth:`ShardWriter.add_file`, checked against the manifest."""
    manifest = read_manifest(location) if manifest is None else manifest
    entry = (manifest.get("artifacts") or {}).get(name)
    if entry is None:
        raise ShardError(f"{location}: the dataset holds no artifact {name!r}")
    _where, base, local = manifest_location(location)
    url = os.path.join(base, entry["url"]) if local else f"{base}/{entry['url']}"
    try:
        data = read_all(url, local, int(entry["bytes"]))
    except OSError as error:
        raise ShardError(f"artifact {name!r} ({url}): cannot read ({error})") from error
    if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise ShardError(f"artifact {name!r} ({url}): size or sha256 differs from the manifest")
    return data

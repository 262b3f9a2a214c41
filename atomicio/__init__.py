"""Atomic file writes, written once for every package: after a crash a file holds its old bytes or its new
bytes, never a mix, and no half-written file appears under the final name.

The sequence is: write ``NAME.tmp`` in the target's own directory (a rename is atomic only within one
filesystem), fsync it, ``os.replace`` it onto ``NAME``, fsync the directory so the rename itself survives a
power cut (best effort: some platforms cannot open a directory). Any failure, ``KeyboardInterrupt`` included,
removes the temporary file and re-raises; only a hard kill (SIGKILL, power loss) can leave ``NAME.tmp``
behind, which is why code that scans its own directories (``shards.ShardWriter``) deletes ``*.tmp`` files
(:data:`TMP_SUFFIX`) on the next start. Two processes must not write the same target at once.

Standard library only: ``import atomicio`` never imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TMP_SUFFIX", "fsync_dir", "temp_path", "write_atomic", "write_json_atomic"]

#: Suffix of the temporary sibling that :func:`write_atomic` renames onto its target.
TMP_SUFFIX = ".tmp"

Data = bytes | bytearray | memoryview | str | Callable[[Path], None]


def temp_path(path: str | os.PathLike[str]) -> Path:
    """The temporary sibling :func:`write_atomic` writes before the rename: ``NAME`` -> ``NAME.tmp``."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Makes renames inside directory ``path`` durable. Best effort: some platforms and filesystems cannot
    open or fsync a directory, and then this does nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: Data) -> None:
    """Replaces the file at ``path`` with ``data`` atomically (the parent directory must exist).

    ``data`` is bytes, a str (written as UTF-8), or a callable that is given the temporary path and writes
    the whole file there, e.g. ``lambda tmp: torch.save(obj, tmp)``; it must close what it opens. The file
    is then fsynced, renamed onto ``path`` and the directory fsynced. On any failure the temporary file is
    removed, ``path`` keeps its old content, and the exception propagates unchanged.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        if callable(data):
            data(tmp)
            with open(tmp, "rb+") as handle:  # writable: some platforms cannot fsync a read-only handle
                os.fsync(handle.fileno())
        else:
            payload = data.encode("utf-8") if isinstance(data, str) else data
            with open(tmp, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the original error is the one worth reporting
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike[str], value: Any, **json_kwargs: Any) -> None:
    """:func:`write_atomic` of ``json.dumps(value, **json_kwargs)`` plus a final newline, as UTF-8."""
    write_atomic(path, json.dumps(value, **json_kwargs) + "\n")

"""Atomic file writes, written once for every package: after a crash a file holds its old bytes or its new
bytes, never a mix, and no half-written file appears under the final name.

The sequence is: write a temporary sibling in the target's own directory (a rename is atomic only within one
filesystem), fsync it, ``os.replace`` it onto ``NAME``, fsync the directory so the rename itself survives a
power cut (best effort: some platforms cannot open a directory). Any failure, ``KeyboardInterrupt`` included,
removes the temporary file and re-raises; only a hard kill (SIGKILL, power loss) can leave it behind.

The temporary is ``NAME.<pid>.<token>.tmp`` (:func:`temp_path`), fresh for every call: two writers of one file
(threads, processes, DDP ranks filling one cache) never write into each other's temporary, and the last rename
wins whole. The pid in the name lets a later start tell a dead writer's leftover from a live one's
(:func:`remove_stale_temporaries`); code that owns a directory under a lock (``shards.ShardWriter``) deletes its
own ``*.tmp`` files (:data:`TMP_SUFFIX`) outright.

Standard library only: ``import atomicio`` never imports torch.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TMP_SUFFIX", "fsync_dir", "pid_alive", "remove_stale_temporaries", "temp_owner", "temp_path",
           "write_atomic", "write_json_atomic"]

#: Suffix of the temporary sibling that :func:`write_atomic` renames onto its target.
TMP_SUFFIX = ".tmp"
# NAME.<pid>.<token>.tmp, as temp_path makes it.
_TEMP_NAME = re.compile(rf"^.+\.(?P<pid>\d+)\.[0-9a-f]+{re.escape(TMP_SUFFIX)}$")

Data = bytes | bytearray | memoryview | str | Callable[[Path], None]


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary sibling for writing ``path``: ``NAME.<pid>.<token>.tmp``, unique per process and call."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def temp_owner(name: str) -> int | None:
    """The pid recorded in a temporary's file name (as :func:`temp_path` makes it), or None."""
    match = _TEMP_NAME.match(name)
    return int(match.group("pid")) if match else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Deletes the temporaries in ``directory`` (not below it) that a dead process left: files named as
    :func:`temp_path` names them whose pid no longer runs. A live writer's temporary is kept. Returns what
    was removed; a file that cannot be removed is skipped (best effort: it is only clutter)."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        pid = temp_owner(entry.name)
        if pid is None or pid_alive(pid) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


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
    the whole file there, e.g. ``lambda tmp: image.save(tmp)``; it must close what it opens (for torch objects use
    :func:`write_torch_atomic`: a name-dependent archive would differ from run to run). The file
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


def write_torch_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically, serialised in memory first: ``torch.save`` to a file records
    that file's name inside the archive, and the temporary's name holds the pid, so the same object would give
    different bytes from run to run."""
    import io

    import torch  # only here: atomicio serves packages that never touch torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


def write_json_atomic(path: str | os.PathLike[str], value: Any, **json_kwargs: Any) -> None:
    """:func:`write_atomic` of ``json.dumps(value, **json_kwargs)`` plus a final newline, as UTF-8."""
    write_atomic(path, json.dumps(value, **json_kwargs) + "\n")

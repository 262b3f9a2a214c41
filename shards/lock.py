"""One writer per dataset folder: an exclusive ``fcntl.flock`` on ``DIR/.dfkd-shards.lock``.

Every command that writes a dataset folder (``ShardWriter.open``, ``shards.merge``) holds it for as long as it
writes. A second writer fails at once with a :class:`ShardError` naming the holder (pid, host, start time, as
the holder wrote them into the file) instead of interleaving its shards with the first one's. The kernel drops a
flock when its process dies, however it dies, so the lock file a killed run leaves behind is simply taken over
by the next writer: a stale lock never needs deleting by hand. The holder removes the file when it lets go.

``distill run`` / ``distill train`` hold the same kind of lock on their output folder under another name
(``FolderLock.acquire(out, name=...)``), so two students never write one folder's checkpoint and metrics.

POSIX only (``fcntl``); on a network filesystem the lock is as good as its ``flock`` support.
"""

from __future__ import annotations

import fcntl
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

from .format import LOCK_NAME, ShardError


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 512).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    if not text:
        return "a process that has not written its pid yet"
    if text.split()[0] == f"pid={os.getpid()}":
        text += " (this process)"
    return text.replace("pid=", "pid ", 1)


class FolderLock:
    """An exclusive lock on one folder, held until :meth:`release` (or until this process ends)."""

    def __init__(self, folder: Path, fd: int, name: str = LOCK_NAME):
        self.folder, self.name = folder, name
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: str | os.PathLike[str], name: str = LOCK_NAME) -> FolderLock:
        """Locks ``folder`` (which must exist) through its lock file ``name``, or raises ShardError naming the
        process that holds it."""
        folder = Path(folder)
        path = folder / name
        while True:
            try:
                # O_NOFOLLOW: a planted symlink named like the lock file must not make us create files elsewhere.
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as error:
                raise ShardError(f"{folder}: cannot create the lock file {name} ({error})") from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise ShardError(f"{folder} is locked by another writer: {holder}. One command writes a "
                                 f"folder at a time; wait for it to finish, or choose another folder") from None
            except OSError as error:
                os.close(fd)
                raise ShardError(f"{folder}: cannot lock {name} ({error})") from error
            # The holder we waited on may have removed the file between our open and our flock: then we hold a
            # lock on a file nobody else will open. Lock the file that is there now instead.
            try:
                current = os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        started = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        return cls(folder, fd, name)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def moved_to(self, folder: str | os.PathLike[str]) -> None:
        """The locked folder was renamed to ``folder`` (the lock file went with it)."""
        self.folder = Path(folder)

    def release(self) -> None:
        """Removes the lock file (when it is still the one locked) and lets go; safe to call twice."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            path = self.folder / self.name
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                path.unlink()  # while still locked, so no one can be waiting on this file
        except OSError:
            pass  # already gone, or the folder with it: nothing left to clean
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

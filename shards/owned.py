"""The one rule for what a dataset command may delete: only files it made itself, recognised by exact name, directly
inside the dataset folder (or its ``resume/`` folder), never through a symlinked folder, and only while it holds the
folder's lock (:mod:`shards.lock`).

Files a writer makes, and so may delete: ``shard-NNNNNN.tar`` not (yet) listed in the manifest,
``resume/state-NNNNNN.pt`` and ``resume/prepare-NNNNNN.pt`` other than the ones it lists, and the temporaries of
these, of ``manifest.json`` and of artifacts (:func:`atomicio.temp_path` names). Everything else in a folder is
someone else's. A folder without a manifest holds no files of ours except a first manifest's temporary and the
lock: anything more, e.g. ``shard-000000.tar`` from another tool, makes the folder foreign, and it is refused
untouched.
"""

from __future__ import annotations

import re
from pathlib import Path

from atomicio import TMP_SUFFIX

from .format import LOCK_NAME, MANIFEST_NAME, PREPARE_PATTERN, RESUME_DIR, SHARD_PATTERN, STATE_PATTERN, ShardError

# A temporary as atomicio.temp_path names it (NAME.<pid>.<token>.tmp), or as older versions did (NAME.tmp).
_TEMPORARY = re.compile(rf"^(?P<target>.+?)(\.\d+\.[0-9a-f]+)?{re.escape(TMP_SUFFIX)}$")


def temporary_target(name: str) -> str | None:
    """The file a temporary named ``name`` was going to become, or None when ``name`` is no temporary."""
    match = _TEMPORARY.match(name)
    return match.group("target") if match else None


def is_state_name(name: str) -> bool:
    """A name the writer gives the files of its ``resume/`` folder (a shard's state or a set-up's progress)."""
    return bool(STATE_PATTERN.match(name) or PREPARE_PATTERN.match(name))


def is_writer_temporary(name: str, artifacts: set[str] = frozenset()) -> bool:
    """A temporary of the manifest, a shard or one of the dataset's ``artifacts``."""
    target = temporary_target(name)
    return target is not None and (target == MANIFEST_NAME or bool(SHARD_PATTERN.match(target))
                                   or target in artifacts)


def foreign_entries(folder: Path) -> list[str]:
    """What in a folder without a manifest is not a killed writer's own: everything but the lock and the first
    manifest's temporary. Sorted names; empty when the folder is missing or holds only those."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name != LOCK_NAME and not (temporary_target(p.name) == MANIFEST_NAME and _not_a_folder(p)))


def refuse_foreign(folder: Path) -> None:
    """ShardError, with nothing changed, when ``folder`` is a non-empty folder that is not a dataset of ours."""
    if (folder / MANIFEST_NAME).exists():
        return
    foreign = foreign_entries(folder)
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ShardError(f"{folder} is not empty and holds no dataset manifest ({shown}); nothing was changed. "
                         "Choose an empty or new directory.")


def _not_a_folder(path: Path) -> bool:
    # A symlink counts as a file: deleting it removes the link, never what it points to.
    return path.is_symlink() or not path.is_dir()


def resume_folder(out: Path) -> Path:
    """``out/resume``; ShardError (nothing changed) when it is a symlink or not a folder, since everything a
    writer deletes there would be deleted wherever it points."""
    path = out / RESUME_DIR
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ShardError(f"{path} is a symlink or not a folder; a dataset's resume folder must be a plain folder "
                         "inside it (nothing is deleted through a symlink). Nothing was changed; remove it to "
                         "continue.")
    return path


def remove_leftovers(out: Path, listed: set[str], artifacts: set[str], keep_states: set[str]) -> None:
    """After a killed run, under the lock: unlisted shards, temporaries and stale states of ``out`` (all but
    ``keep_states``, the ``resume/...`` names the manifest lists)."""
    for path in out.iterdir():
        name = path.name
        if not _not_a_folder(path):
            continue
        if is_writer_temporary(name, artifacts) or (SHARD_PATTERN.match(name) and name not in listed):
            path.unlink(missing_ok=True)  # a symlink named like a shard: the link goes, never its target
    states = resume_folder(out)
    if states.is_dir():
        for path in states.iterdir():
            target = temporary_target(path.name) or path.name
            if is_state_name(target) and f"{RESUME_DIR}/{path.name}" not in keep_states and _not_a_folder(path):
                path.unlink(missing_ok=True)


def remove_state(out: Path, rel: str | None) -> None:
    """Deletes the state ``rel`` (``resume/state-NNNNNN.pt`` or ``resume/prepare-NNNNNN.pt``, as validated) when
    it is one."""
    if not rel:
        return
    folder, _, name = rel.partition("/")
    if folder == RESUME_DIR and is_state_name(name):
        (resume_folder(out) / name).unlink(missing_ok=True)


def remove_resume_folder(out: Path) -> None:
    """Deletes every state file of ``out/resume`` and the folder itself when nothing else is in it."""
    states = resume_folder(out)
    if not states.is_dir():
        return
    for path in states.iterdir():
        if is_state_name(temporary_target(path.name) or path.name) and _not_a_folder(path):
            path.unlink(missing_ok=True)
    try:
        states.rmdir()
    except OSError:
        pass  # something that is not ours is in it: it stays, and so does the folder

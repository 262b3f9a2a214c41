"""Opening a dataset folder for writing: create it, or resume the dataset in it (:meth:`shards.ShardWriter.open`).

Every check that can refuse comes before the first change to the folder, and a refusal changes nothing: a
folder that is not this format's dataset (files but no manifest), a different identity, a damaged dataset, a
resume folder that is a symlink, a folder another writer holds. Only then, holding the folder's lock
(:mod:`shards.lock`), does it delete what a killed run of its own left behind (:mod:`shards.owned`).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCK_NAME,
    MANIFEST_NAME,
    ShardError,
    canonical_json,
    make_schema,
    summary_from_shards,
    tool_version,
)
from .lock import FolderLock
from .owned import refuse_foreign, remove_leftovers, resume_folder, temporary_target
from .validation import validate_manifest

# The writer class (shards.writer.ShardWriter), passed in: this module must not import the writer, which imports it.
Writer = TypeVar("Writer")

# Top-level manifest fields the caller's ``header`` may not overwrite.
RESERVED = frozenset({
    "format", "format_version", "tool_version", "identity", "schema", "num_classes", "target_samples",
    "num_samples", "complete", "class_counts", "shards", "summary", "resume_state", "prepare_state", "created",
    "updated", "artifacts", "shard_size", "stop", "source_counts", "key_offset", "resolution_counts",
})


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def identity_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable lines for every leaf that differs between two JSON values."""
    def show(value: Any) -> str:
        text = json.dumps(value, sort_keys=True)
        return text if len(text) <= 80 else text[:77] + "..."

    if isinstance(old, dict) and isinstance(new, dict):
        lines: list[str] = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                lines.append(f"{path}: absent in the existing dataset, {show(new[key])} now")
            elif key not in new:
                lines.append(f"{path}: {show(old[key])} in the existing dataset, absent now")
            else:
                lines.extend(identity_diff(old[key], new[key], path))
        return lines
    # Compare as JSON text so that true and 1, or 1 and 1.0, count as different.
    if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
        return [f"{prefix or '(identity)'}: {show(old)} in the existing dataset, {show(new)} now"]
    return []


def _check_arguments(out: Path, identity: Any, header: Any, target_samples: Any, shard_size: Any,
                     image_shape: Any, num_classes: Any, key_offset: Any) -> tuple[Any, Any, Any]:
    if not isinstance(target_samples, int) or target_samples < 1:
        raise ShardError(f"target_samples must be a positive integer, got {target_samples!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ShardError(f"shard_size must be a positive integer, got {shard_size!r}")
    if not isinstance(identity, dict) or not isinstance(header, dict):
        raise ShardError("identity and header must be dicts")
    identity = canonical_json(identity, "identity")
    header = canonical_json(header, "header")
    clash = sorted(RESERVED & set(header))
    if clash:
        raise ShardError(f"header may not set the manifest's own fields: {', '.join(clash)}")
    if image_shape is not None:
        image_shape = tuple(int(v) for v in image_shape)
        if len(image_shape) != 3 or image_shape[2] not in (1, 3) or min(image_shape) < 1:
            raise ShardError(f"image_shape must be (H, W, C) with C 1 or 3, got {image_shape}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ShardError(f"num_classes must be a positive integer, got {num_classes!r}")
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out} exists and is not a directory")
    if isinstance(key_offset, bool) or not isinstance(key_offset, int) or key_offset < 0:
        raise ShardError(f"key_offset must be a non-negative integer, got {key_offset!r}")
    return identity, header, image_shape


def open_dataset(cls: type[Writer], out_dir: str | os.PathLike[str], *, identity: dict[str, Any],
                 header: dict[str, Any], target_samples: int, shard_size: int,
                 image_shape: tuple[int, int, int] | None, num_classes: int | None, key_offset: int,
                 mixed_sizes: bool) -> Writer:
    """What :meth:`ShardWriter.open` does (see there); ``cls`` builds the writer."""
    out = Path(out_dir)
    identity, header, image_shape = _check_arguments(out, identity, header, target_samples, shard_size,
                                                     image_shape, num_classes, key_offset)
    refuse_foreign(out)  # before the lock file: a foreign folder is refused without a single new file in it
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ShardError(f"cannot create dataset directory {out}: {error}") from error
    lock = FolderLock.acquire(out)
    try:
        if (out / MANIFEST_NAME).exists():
            writer = _resume(cls, out, lock, identity, header, target_samples, shard_size, image_shape,
                             num_classes, mixed_sizes)
            if writer.key_offset != key_offset:  # the identity normally catches this first
                raise ShardError(f"{out}: its keys start at {writer.key_offset}, asked for {key_offset}")
            return writer
        return _create(cls, out, lock, identity, header, target_samples, shard_size, image_shape, num_classes,
                       key_offset, mixed_sizes)
    except BaseException:
        lock.release()
        if created:
            try:
                out.rmdir()  # a refused open leaves no folder it made (only if nothing else appeared in it)
            except OSError:
                pass
        raise


def _create(cls: type[Writer], out: Path, lock: FolderLock, identity: dict[str, Any], header: dict[str, Any],
            target_samples: int, shard_size: int, image_shape: Any, num_classes: int | None, key_offset: int,
            mixed_sizes: bool) -> Writer:
    refuse_foreign(out)  # again, under the lock: another process may have written here since the first look
    for path in out.iterdir():  # all that can be here now: the lock, a killed writer's first-manifest temporary
        if path.name != LOCK_NAME and temporary_target(path.name) == MANIFEST_NAME:
            path.unlink(missing_ok=True)
    stamp = now()
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool_version": tool_version(),
        "identity": identity,
        **header,
        "schema": make_schema(image_shape, num_classes),
        "num_classes": num_classes,
        "target_samples": target_samples,
        "shard_size": shard_size,
        "num_samples": 0,
        "complete": False,
        "class_counts": [0] * num_classes if num_classes else [],
        "shards": [],
        "summary": summary_from_shards([], 0),
        "artifacts": {},
        "resume_state": None,
        "created": stamp,
        "updated": stamp,
    }
    if key_offset:  # absent when 0, so plain datasets keep the manifest they always had
        manifest["key_offset"] = key_offset
    writer = cls(out, manifest, shard_size, mixed_sizes, lock=lock)
    # Claims the directory at once, so a run with another identity refuses even before the first shard.
    writer._commit_manifest(manifest, lambda error: f"cannot write {out / MANIFEST_NAME}: {error}")
    return writer


def _resume(cls: type[Writer], out: Path, lock: FolderLock, identity: dict[str, Any], header: dict[str, Any],
            target_samples: int, shard_size: int, image_shape: tuple[int, ...] | None, num_classes: int | None,
            mixed_sizes: bool) -> Writer:
    manifest_path = out / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(f"{manifest_path}: cannot read the dataset manifest ({error}); "
                         "nothing was changed") from None
    validate_manifest(manifest, str(manifest_path))
    # Every check that can refuse comes before the first change to the directory.
    diff = identity_diff(manifest["identity"], identity)
    if diff:
        raise ShardError(
            f"{out} holds a different dataset; refusing to mix them, nothing was changed.\n  "
            + "\n  ".join(diff)
            + "\nUse another output directory, or delete this one to start over.")
    stored_shape = manifest["schema"]["image"]["shape"]
    if image_shape is not None and stored_shape is not None and list(image_shape) != stored_shape:
        raise ShardError(f"{out}: stores images of shape {stored_shape}, asked for {list(image_shape)}; "
                         "nothing was changed") from None
    if num_classes is not None and manifest.get("num_classes") not in (None, num_classes):
        raise ShardError(f"{out}: stores {manifest['num_classes']} classes, asked for {num_classes}; "
                         "nothing was changed") from None
    for entry in manifest["shards"]:
        path = out / entry["url"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
            raise ShardError(f"{path}: listed in the manifest with {entry['bytes']} bytes but {found}; the "
                             "dataset is damaged (run verify), nothing was changed") from None
    resume_folder(out)  # refuses a symlinked resume folder before anything is deleted

    # Clean up what a killed run may have left: temporaries, shards never committed, stale states.
    kept = {manifest.get("resume_state"), (manifest.get("prepare_state") or {}).get("url")} - {None}
    remove_leftovers(out, {entry["url"] for entry in manifest["shards"]}, set(manifest.get("artifacts") or {}), kept)

    def apply_open_arguments(changed: dict[str, Any]) -> None:
        changed.update(header)
        changed["target_samples"] = target_samples
        changed["shard_size"] = shard_size
        changed["complete"] = bool(manifest["complete"]) and manifest["num_samples"] >= target_samples
        if image_shape is not None and stored_shape is None:
            changed["schema"] = make_schema(image_shape, changed.get("num_classes") or num_classes)
        if num_classes is not None and manifest.get("num_classes") is None:
            changed["num_classes"] = num_classes
            changed["class_counts"] = [0] * num_classes
            changed["schema"] = make_schema(changed["schema"]["image"]["shape"], num_classes)

    writer = cls(out, manifest, shard_size, mixed_sizes, lock=lock)
    writer._commit_manifest(apply_open_arguments, lambda error: f"cannot write {manifest_path}: {error}",
                            only_if_changed=True)
    return writer

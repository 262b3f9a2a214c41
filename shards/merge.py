"""Uniting datasets: ``synth merge A B … --out C`` (fan-out parts, or separate runs of one teacher).

Compatible means one teacher (sha256), one format version, one image shape and class count, and every source
complete. Each source's method, config, identity and commands are kept in ``manifest["lineage"]``; every
shard entry says which source it came from. Shards keep their bytes when the sources' key ranges are disjoint
(fan-out parts always are): ``link`` then hard-links them into C (a relative symlink where the filesystem
cannot), otherwise they are copied. Overlapping keys (two ordinary runs both start at 0) are renumbered,
which rewrites the tars, so it needs a copy and refuses ``link``.

A source is untrusted input: every one is verified whole (:func:`shards.verify`: sizes, sha256, member names,
keys, decodability) before a byte is copied, and bytes are checked again as they are copied. C must be new or
an empty folder. The merge is built in a hidden sibling ``.C.merging`` that it locks (a second merge into C is
refused naming the first one's pid) and renamed onto C only when complete: a failed merge leaves no C, and a
killed one leaves only the hidden folder, which the next merge into C takes over.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from atomicio import fsync_dir, temp_path, write_atomic, write_json_atomic

from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCK_NAME,
    MANIFEST_NAME,
    SHARD_PATTERN,
    ShardError,
    image_shapes,
    sample_key,
    shard_name,
    summary_from_shards,
    tool_version,
)
from .locations import Location, is_url
from .lock import FolderLock
from .manifests import read_manifest
from .owned import temporary_target
from .tario import HashingWriter, MeteredReader, iter_tar, tar_member
from .validation import shard_first_indices, validate_manifest
from .verify import verify

_KEPT_SHARD_FIELDS = ("num_samples", "bytes", "sha256", "first_index", "agreement_count", "entropy_sum",
                      "synthesis_seconds")
# The only member names a shard of this format holds (verify has checked every source against this).
_MEMBER = re.compile(r"^(\d+)\.(png|cls|logits\.npy|json)$")
_CHUNK = 1 << 20


def _teacher_sha(manifest: dict[str, Any]) -> str | None:
    return (manifest.get("teacher") or {}).get("sha256") or (manifest.get("identity") or {}).get("teacher_sha256")


def _check_compatible(sources: list[tuple[str, dict[str, Any]]]) -> None:
    first_where, first = sources[0]
    for where, manifest in sources:
        if not manifest["complete"]:
            raise ShardError(f"{where}: the dataset is incomplete ({manifest['num_samples']} of "
                             f"{manifest['target_samples']} samples); finish it (rerun its command) before merging")
        if manifest["num_samples"] == 0:
            raise ShardError(f"{where}: the dataset holds no samples")
        for what, mine, theirs in (
                ("format_version", manifest["format_version"], first["format_version"]),
                ("teacher sha256", _teacher_sha(manifest), _teacher_sha(first)),
                ("image shapes", sorted(image_shapes(manifest)) or None, sorted(image_shapes(first)) or None),
                ("num_classes", manifest["num_classes"], first["num_classes"])):
            if mine != theirs or mine is None:
                raise ShardError(f"{where}: {what} is {mine!r} but {first_where} has {theirs!r}; only datasets of "
                                 "one teacher and format can be merged")


def _plan(sources: list[tuple[str, dict[str, Any]]]) -> tuple[list[dict[str, Any]], bool]:
    """Every shard as ``{source, entry, path}`` in key order, and whether keys must be renumbered."""
    items = []
    for index, (where, manifest) in enumerate(sources):
        for entry, first in zip(manifest["shards"], shard_first_indices(manifest), strict=True):
            items.append({"source": index, "entry": entry, "path": Path(where) / entry["url"], "first": first})
    items.sort(key=lambda s: (s["first"], s["source"]))
    overlap = any(a["first"] + a["entry"]["num_samples"] > b["first"] for a, b in itertools.pairwise(items))
    return items, overlap


def _checked(reader: Any, entry: dict[str, Any]) -> MeteredReader:
    return MeteredReader(reader, entry["url"], entry["bytes"])


def _changed(src: Path) -> ShardError:
    return ShardError(f"{src}: changed while it was merged (its bytes no longer match its manifest); nothing was "
                      "merged")


def _place(src: Path, dest: Path, entry: dict[str, Any], link: bool) -> str:
    """Puts the shard ``src`` at ``dest`` atomically, unchanged: a hard link, else a symlink, or a copy."""
    if not link:
        def copy(tmp: Path) -> None:
            shutil.copyfile(src, tmp)  # the kernel's fast path; then the copy itself is checked
            with open(tmp, "rb") as handle:
                reader = _checked(handle, entry)
                while reader.read(_CHUNK):
                    pass
            if not reader.matches(entry):
                raise _changed(src)

        write_atomic(dest, copy)
        return "copy"
    tmp = temp_path(dest)
    try:
        os.link(src, tmp)
        how = "hardlink"
    except OSError:  # another filesystem, or one without hard links
        os.symlink(os.path.relpath(src.resolve(), dest.parent.resolve()), tmp)
        how = "symlink"
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    return how


def _renumbered(src: Path, dest: Path, entry: dict[str, Any], first: int) -> dict[str, Any]:
    """Copies shard ``src`` to ``dest`` with its samples' keys renumbered from ``first`` (same member order,
    the writer's fixed tar metadata); returns the new size and sha256."""
    hashing: HashingWriter | None = None

    def write(tmp: Path) -> None:
        nonlocal hashing
        with open(src, "rb") as handle, open(tmp, "wb") as out:
            reader = _checked(handle, entry)
            hashing = HashingWriter(out)
            with tarfile.open(fileobj=hashing, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
                keys: dict[str, str] = {}
                for member, data in iter_tar(reader, entry["url"]):  # type: ignore[arg-type]
                    match = _MEMBER.match(member)
                    if not match:  # verify refused such names already; never write one anyway
                        raise ShardError(f"{src}: member {member!r} is not KEY.EXT; nothing was merged")
                    new = keys.setdefault(match.group(1), sample_key(first + len(keys)))
                    tar.addfile(*tar_member(f"{new}.{match.group(2)}", data))
            if not reader.matches(entry):
                raise _changed(src)

    write_atomic(dest, write)
    assert hashing is not None
    return {"bytes": hashing.size, "sha256": hashing.sha256.hexdigest()}


def _per_class_agreement(sources: list[dict[str, Any]], counts: list[int]) -> list[float | None]:
    """Each class's agreement over all sources: the sources' per-class figures weighted by their counts."""
    agree = [0.0] * len(counts)
    for manifest in sources:
        figures = (manifest.get("summary") or {}).get("per_class_agreement") or []
        for c, value in enumerate(figures[:len(counts)]):
            if value is not None:
                agree[c] += value * manifest["class_counts"][c]
    return [round(a / n, 12) if n else None for a, n in zip(agree, counts, strict=True)]


def merge(sources: list[Location], out: str | os.PathLike[str], *, link: bool = False,
          command: str | None = None) -> dict[str, Any]:
    """Unites the local datasets ``sources`` into a new dataset at ``out``; returns its manifest."""
    out = Path(out)
    if len(sources) < 2:
        raise ShardError("synth merge needs at least two datasets")
    loaded: list[tuple[str, dict[str, Any]]] = []
    for location in sources:
        if is_url(str(location)):
            raise ShardError(f"{location}: merge reads local dataset folders only (download it first)")
        path = Path(location)
        folder = path.parent if path.suffix == ".json" else path
        if folder.resolve() == out.resolve():
            raise ShardError(f"{out}: the output may not be one of the sources")
        loaded.append((str(folder), read_manifest(folder)))
    if len({Path(where).resolve() for where, _ in loaded}) != len(loaded):
        raise ShardError("the same dataset is named twice")
    _check_compatible(loaded)
    plan, overlap = _plan(loaded)
    if overlap and link:
        raise ShardError("the sources' sample keys overlap (they were not made as parts of one fan-out: "
                         "synth run --rank/--world); merge without --link to renumber them (this copies the shards)")
    _check_output(out)
    for where, _manifest in loaded:  # every source whole and as recorded, before anything is written
        problems = verify(where)
        if problems:
            shown = "\n  ".join(str(problem) for problem in problems[:5])
            raise ShardError(f"{where}: not a healthy dataset, nothing was merged (synth verify {where}):\n  {shown}")

    staging = out.parent / f".{out.name}.merging"
    made = _make_parents(out.parent)
    try:
        if staging.is_symlink():
            raise ShardError(f"{staging} is a symlink; a merge builds only in a folder of its own")
        staging.mkdir(exist_ok=True)
        lock = FolderLock.acquire(staging)  # a second merge into ``out`` stops here, naming this one's pid
    except BaseException:
        _remove_made(made)
        raise
    try:
        _clear_staging(staging)  # what a killed merge into ``out`` left; we hold its lock now
        manifest = _build(staging, loaded, plan, overlap, link, command)
        _check_output(out)
        try:
            os.rename(staging, out)  # replaces an empty ``out``; refuses one that filled up meanwhile
        except OSError as error:
            raise ShardError(f"{out}: cannot put the merged dataset there ({error}); nothing was merged") from error
        lock.moved_to(out)
        fsync_dir(out.parent)
    except BaseException:
        if lock.folder == staging:
            try:
                _clear_staging(staging)
            except ShardError:
                pass  # something not ours is in it: the folder stays, the original error is the one to see
            lock.release()
            try:
                staging.rmdir()
            except OSError:
                pass
        _remove_made(made)
        raise
    finally:
        lock.release()
    return manifest


def _build(staging: Path, loaded: list[tuple[str, dict[str, Any]]], plan: list[dict[str, Any]], overlap: bool,
           link: bool, command: str | None) -> dict[str, Any]:
    """The shards and then the manifest of the merged set, in ``staging``."""
    entries = []
    next_key = 0
    for i, item in enumerate(plan):
        name, old = shard_name(i), item["entry"]
        entry = {k: old[k] for k in _KEPT_SHARD_FIELDS if k in old}
        entry.update(url=name, source=item["source"])
        if overlap:
            entry.update(_renumbered(item["path"], staging / name, old, next_key), first_index=next_key)
            entry["placed"] = "renumbered"
        else:
            entry["first_index"] = item["first"]
            entry["placed"] = _place(item["path"], staging / name, old, link)
        next_key += old["num_samples"]
        entries.append(entry)
    manifest = _merged_manifest(loaded, entries, command)
    validate_manifest(manifest, str(staging / MANIFEST_NAME))
    write_json_atomic(staging / MANIFEST_NAME, manifest, indent=2, allow_nan=False)
    return manifest


def _check_output(out: Path) -> None:
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise ShardError(f"{out} exists and is not empty; nothing was changed. Choose a new directory.")


def _make_parents(folder: Path) -> list[Path]:
    """Creates ``folder`` and its missing parents; returns those it made, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return list(reversed(missing))


def _remove_made(made: list[Path]) -> None:
    for path in reversed(made):
        try:
            path.rmdir()
        except OSError:
            break


def _clear_staging(staging: Path) -> None:
    """Deletes the merge's own files from its staging folder: shards, manifest, temporaries (the lock stays)."""
    for path in staging.iterdir():
        name = temporary_target(path.name) or path.name
        if path.name == LOCK_NAME:
            continue
        if path.is_dir() and not path.is_symlink() or not (SHARD_PATTERN.match(name) or name == MANIFEST_NAME):
            raise ShardError(f"{staging} holds {path.name}, which no merge made; nothing was changed. Remove "
                             f"{staging} to merge into {staging.parent}/{staging.name[1:-len('.merging')]}")
        path.unlink()


def _merged_manifest(loaded: list[tuple[str, dict[str, Any]]], entries: list[dict[str, Any]],
                     command: str | None) -> dict[str, Any]:
    manifests = [m for _, m in loaded]
    first = manifests[0]
    num_samples = sum(e["num_samples"] for e in entries)
    counts = [sum(m["class_counts"][c] for m in manifests) for c in range(first["num_classes"])]
    sources: dict[str, int] = {}
    for manifest in manifests:
        for key, value in (manifest.get("source_counts") or {"unspecified": manifest["num_samples"]}).items():
            sources[key] = sources.get(key, 0) + int(value)
    resolutions: dict[str, int] = {}  # multi-resolution parts (K-Gen): their per-size counts add up
    for manifest in manifests:
        for key, value in (manifest.get("resolution_counts") or {}).items():
            resolutions[key] = resolutions.get(key, 0) + int(value)
    names = sorted({(m.get("method") or {}).get("name") or "?" for m in manifests})
    lineage = []
    for index, (where, manifest) in enumerate(loaded):
        raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        lineage.append({
            "location": where, "manifest_sha256": hashlib.sha256(raw).hexdigest(),
            "method": manifest.get("method"), "identity": manifest["identity"],
            "num_samples": manifest["num_samples"], "class_counts": manifest["class_counts"],
            "summary": manifest.get("summary"), "commands": manifest.get("commands") or [],
            "shards": [e["url"] for e in entries if e["source"] == index],
        })
    now = datetime.now(UTC).isoformat(timespec="seconds")
    seconds = [e["synthesis_seconds"] for e in entries if "synthesis_seconds" in e]
    summary = {**summary_from_shards(entries, num_samples),
               "per_class_agreement": _per_class_agreement(manifests, counts)}
    if seconds:
        summary["synthesis_seconds"] = round(math.fsum(seconds), 3)
    merged = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tool_version": tool_version(),
        "identity": {"merge": [item["manifest_sha256"] for item in lineage]},
        "method": {"name": names[0] if len(names) == 1 else "+".join(names), "merged_from": len(loaded)},
        "teacher": first.get("teacher"),
        "schema": first["schema"], "num_classes": first["num_classes"], "target_samples": num_samples,
        "shard_size": max(e["num_samples"] for e in entries), "num_samples": num_samples, "complete": True,
        "class_counts": counts, "source_counts": dict(sorted(sources.items())), "shards": entries,
        "summary": summary, "artifacts": {}, "resume_state": None, "lineage": lineage,
        "commands": [command] if command else [], "created": now, "updated": now,
    }
    if resolutions:
        merged["resolution_counts"] = dict(sorted(resolutions.items()))
    return merged


__all__ = ["merge"]

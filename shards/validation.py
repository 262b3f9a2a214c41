"""Checking a manifest before anything trusts it: every field a reader or writer acts on has its type and range
checked here, and every path in it (shard URLs, artifacts, the resume state) is a plain relative name inside the
dataset folder. A manifest is untrusted input (a downloaded dataset, a folder from a stranger); what passes
:func:`validate_manifest` cannot make a reader crash with a traceback, read outside the folder, or a writer delete
outside it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .format import (
    FORMAT_NAME,
    IMAGE_EXT,
    LABEL_EXT,
    LOGITS_EXT,
    MAX_IMAGE_PIXELS,
    META_EXT,
    PREPARE_PATTERN,
    READABLE_VERSIONS,
    RESUME_DIR,
    STATE_PATTERN,
    ShardError,
    tool_version,
)

_REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "format_version": int,
    "identity": dict,
    "schema": dict,
    "num_samples": int,
    "target_samples": int,
    "complete": bool,
    "class_counts": list,
    "shards": list,
    "summary": dict,
}
# Optional top-level blocks that readers index into: when present they must be objects.
_OPTIONAL_OBJECTS = ("method", "teacher", "artifacts", "source_counts", "resolution_counts")
_SHARD_FIELDS: dict[str, type] = {"url": str, "num_samples": int, "bytes": int, "sha256": str}
# A path segment: letters, digits, '_', '.', '-', not starting with '.'. Nothing a URL, a shell, fsspec ('::'
# chaining, '%'-escapes, '?', '#') or a filesystem ('..', '~', '\\', ':') could read as more than a name.
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_relative_url(url: Any, where: str, what: str = "shard URL") -> None:
    """ShardError unless ``url`` is a plain relative path inside the dataset folder (segments as above)."""
    if not isinstance(url, str) or not url or not all(_SEGMENT.match(part) for part in url.split("/")):
        raise ShardError(f"{where}: {what} {url!r} is not a plain relative name inside the dataset directory")


def check_resume_state(value: Any, where: str) -> None:
    """``resume_state`` is None or ``resume/state-NNNNNN.pt``: the writer deletes it, so nothing else may be named."""
    if value is None:
        return
    parts = value.split("/") if isinstance(value, str) else []
    if len(parts) != 2 or parts[0] != RESUME_DIR or not STATE_PATTERN.match(parts[1]):
        raise ShardError(f"{where}: resume_state {value!r} is not {RESUME_DIR}/state-NNNNNN.pt; a manifest may only "
                         "name the writer's own resume state")


def check_prepare_state(value: Any, where: str) -> None:
    """``prepare_state`` is absent, None or ``{"url": "resume/prepare-NNNNNN.pt", "seconds": s >= 0}``."""
    if value is None:
        return
    url = value.get("url") if isinstance(value, dict) else None
    parts = url.split("/") if isinstance(url, str) else []
    if len(parts) != 2 or parts[0] != RESUME_DIR or not PREPARE_PATTERN.match(parts[1]):
        raise ShardError(f"{where}: prepare_state {value!r} does not name {RESUME_DIR}/prepare-NNNNNN.pt; a manifest "
                         "may only name the writer's own files")
    seconds = value.get("seconds")
    if not _number(seconds) or not math.isfinite(seconds) or seconds < 0:
        raise ShardError(f"{where}: prepare_state seconds {seconds!r} is not a non-negative number")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shard_first_indices(manifest: dict[str, Any]) -> list[int]:
    """The global index of each shard's first sample: its ``first_index``, or (older sets) the samples before it."""
    firsts, position = [], int(manifest.get("key_offset", 0))
    for entry in manifest["shards"]:
        first = entry.get("first_index", position)
        firsts.append(first)
        position = first + entry["num_samples"]
    return firsts


def _check_shape(shape: Any, where: str, what: str) -> None:
    if (not isinstance(shape, list) or len(shape) != 3 or shape[2] not in (1, 3)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise ShardError(f"{where}: {what} must be [H, W, C] with C 1 or 3, got {shape!r}")
    if shape[0] * shape[1] > MAX_IMAGE_PIXELS:
        raise ShardError(f"{where}: {what} {shape} has {shape[0] * shape[1]} pixels per image, more than the "
                         f"{MAX_IMAGE_PIXELS} pixels this format allows")


def _check_schema(manifest: dict[str, Any], where: str) -> None:
    schema = manifest["schema"]
    for part, ext in (("image", IMAGE_EXT), ("label", LABEL_EXT), ("logits", LOGITS_EXT), ("meta", META_EXT)):
        if not isinstance(schema.get(part), dict) or schema[part].get("ext") != ext:
            raise ShardError(f"{where}: schema.{part} must be a dict with ext {ext!r}; this tool reads only that")
    if schema["image"].get("dtype") != "uint8" or schema["logits"].get("dtype") != "float16":
        raise ShardError(f"{where}: schema dtypes must be uint8 images and float16 logits")
    image_shape = schema["image"].get("shape")
    num_classes = manifest.get("num_classes")
    if num_classes is not None and (not _count(num_classes) or num_classes < 1):
        raise ShardError(f"{where}: num_classes must be a positive integer, got {num_classes!r}")
    if image_shape is not None or manifest["num_samples"] > 0:
        _check_shape(image_shape, where, "schema.image.shape")
    if manifest["num_samples"] == 0:
        return
    if num_classes is None:
        raise ShardError(f"{where}: num_classes must be a positive integer, got None")
    shapes = schema["image"].get("shapes")
    if shapes is not None:
        if not isinstance(shapes, list) or image_shape not in shapes:
            raise ShardError(f"{where}: schema.image.shapes must list [H, W, C] shapes of one channel count, "
                             f"schema.image.shape among them; got {shapes!r}")
        for shape in shapes:
            _check_shape(shape, where, "each of schema.image.shapes")
            if shape[2] != image_shape[2]:
                raise ShardError(f"{where}: schema.image.shapes mixes channel counts: {shapes!r}")
    if schema["logits"].get("shape") != [num_classes]:
        raise ShardError(f"{where}: schema.logits.shape {schema['logits'].get('shape')!r} "
                         f"disagrees with num_classes {num_classes}")


def _check_shards(manifest: dict[str, Any], where: str) -> None:
    total = 0
    seen: set[str] = set()
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict):
            raise ShardError(f"{where}: shards[{i}] is not an object")
        for field, kind in _SHARD_FIELDS.items():
            if not isinstance(entry.get(field), kind) or isinstance(entry.get(field), bool):
                raise ShardError(f"{where}: shards[{i}] lacks {field!r} or it has the wrong type")
        check_relative_url(entry["url"], where)
        if entry["url"] in seen:
            raise ShardError(f"{where}: shard {entry['url']} is listed twice")
        seen.add(entry["url"])
        if not _count(entry["num_samples"]) or not _count(entry["bytes"]) or not _SHA256.match(entry["sha256"]):
            raise ShardError(f"{where}: shards[{i}] ({entry['url']}) has an invalid count, size or sha256")
        for field, check in (("first_index", _count), ("agreement_count", _count), ("entropy_sum", _number),
                             ("synthesis_seconds", _number)):
            if field in entry and not check(entry[field]):
                raise ShardError(f"{where}: shards[{i}] ({entry['url']}) has an invalid {field}: {entry[field]!r}")
        total += entry["num_samples"]
    if total != manifest["num_samples"]:
        raise ShardError(f"{where}: num_samples is {manifest['num_samples']} but the shards list {total} samples")
    # Key ranges may not overlap: with each shard's keys checked against its range, keys are then unique.
    ranges = sorted((first, first + entry["num_samples"], entry["url"])
                    for first, entry in zip(shard_first_indices(manifest), manifest["shards"], strict=True)
                    if entry["num_samples"])
    for (_, end, name), (start, _, other) in zip(ranges, ranges[1:], strict=False):
        if start < end:
            raise ShardError(f"{where}: the key ranges of shards {name} and {other} overlap")


def validate_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """Checks a parsed manifest against this format; returns it or raises ShardError naming ``where``."""
    if not isinstance(manifest, dict):
        raise ShardError(f"{where}: not a dataset manifest (expected a JSON object)")
    if manifest.get("format") != FORMAT_NAME:
        raise ShardError(f"{where}: not a {FORMAT_NAME} manifest (format is {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        readable = ", ".join(str(v) for v in READABLE_VERSIONS)
        raise ShardError(f"{where}: format_version {version!r} is not supported; this tool "
                         f"(dfkd-toolkit {tool_version()}) reads format_version {readable}. "
                         "Upgrade the toolkit to read this dataset.")
    for field, kind in _REQUIRED_FIELDS.items():
        if field not in manifest:
            raise ShardError(f"{where}: manifest lacks the required field {field!r}")
        if not isinstance(manifest[field], kind) or (kind is int and isinstance(manifest[field], bool)):
            raise ShardError(f"{where}: manifest field {field!r} has the wrong type "
                             f"({type(manifest[field]).__name__})")
    for field in _OPTIONAL_OBJECTS:
        if manifest.get(field) is not None and not isinstance(manifest[field], dict):
            raise ShardError(f"{where}: manifest field {field!r} must be an object")
    for field in ("num_samples", "target_samples", "key_offset"):
        if field in manifest and not _count(manifest[field]):
            raise ShardError(f"{where}: manifest field {field!r} must be a non-negative integer")
    _check_schema(manifest, where)
    _check_shards(manifest, where)
    counts = manifest["class_counts"]
    if not all(_count(c) for c in counts):
        raise ShardError(f"{where}: class_counts must be non-negative integers, got {counts[:10]!r}")
    if manifest["num_samples"] > 0 and (len(counts) != manifest["num_classes"]
                                        or sum(counts) != manifest["num_samples"]):
        raise ShardError(f"{where}: class_counts (length {len(counts)}, sum {sum(counts)}) does not fit "
                         f"num_classes {manifest['num_classes']} and num_samples {manifest['num_samples']}")
    for name, entry in (manifest.get("artifacts") or {}).items():
        if not isinstance(entry, dict):
            raise ShardError(f"{where}: artifacts[{name!r}] is not an object")
        check_relative_url(entry.get("url"), where, f"artifact {name!r} URL")
        if not _count(entry.get("bytes")) or not _SHA256.match(str(entry.get("sha256"))):
            raise ShardError(f"{where}: artifacts[{name!r}] has an invalid size or sha256")
    check_resume_state(manifest.get("resume_state"), where)
    check_prepare_state(manifest.get("prepare_state"), where)
    return manifest

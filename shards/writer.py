"""Crash-safe shard writer: the only code that creates or changes a dataset directory.

A run killed at any moment leaves a valid dataset made of the shards finished so far, and
:meth:`ShardWriter.open` on the same directory resumes it. The order of operations in
:meth:`ShardWriter.commit_shard` is what makes this true:

1. validate every sample and the resume state (nothing touches the disk before this passes);
2. write ``shard-XXXXXX.tar.tmp``, fsync, rename to ``shard-XXXXXX.tar``;
3. write ``resume/state-XXXXXX.pt.tmp``, fsync, rename (only when a state is given);
4. write ``manifest.json.tmp``, fsync, rename, fsync the directory — **the commit point**
   (:meth:`ShardWriter._commit_manifest`, the only code that changes the manifest);
5. delete the previous resume state.

Steps 2-4 each go through :func:`atomicio.write_atomic` (``NAME.tmp``, fsync, rename, fsync the directory;
the temporary is removed on any error), so only a hard kill leaves ``*.tmp`` files, which ``open`` deletes.

Before step 4 the new shard is an orphan that readers never see (they read only what the manifest lists) and
that the next ``open`` deletes; after it the shard is part of the dataset. Image shape and ``num_classes`` are
fixed by the first committed shard unless given to ``open`` up front (do that when you know them: a mistake
then fails before hours of synthesis rather than after).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import re
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

from atomicio import TMP_SUFFIX, write_atomic, write_json_atomic

from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_EXT,
    LABEL_EXT,
    LOGITS_EXT,
    MANIFEST_NAME,
    META_EXT,
    SHARD_PATTERN,
    ShardError,
    canonical_json,
    encode_meta,
    encode_npy,
    encode_png,
    image_shapes,
    logit_stats,
    make_schema,
    sample_key,
    shard_name,
    size_key,
    summary_from_shards,
    tool_version,
    validate_manifest,
)

RESUME_DIR = "resume"
# Every file here is written by atomicio.write_atomic, whose temporary sibling is NAME + TMP_SUFFIX ("NAME.tmp"):
# that is what a killed writer can leave behind, and what open() deletes.
_STATE_PATTERN = re.compile(rf"^state-\d{{6,}}\.pt({re.escape(TMP_SUFFIX)})?$")
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Top-level manifest fields the caller's ``header`` may not overwrite.
_RESERVED = frozenset({
    "format", "format_version", "tool_version", "identity", "schema", "num_classes", "target_samples",
    "num_samples", "complete", "class_counts", "shards", "summary", "resume_state", "created", "updated",
    "artifacts", "shard_size", "stop", "source_counts", "key_offset", "resolution_counts",
})


@dataclass
class Sample:
    """One stored sample. ``key`` is the zero-padded global index (``"%09d" % index``)."""

    key: str
    image: np.ndarray  # uint8 H×W×C, C = 1 or 3: exactly the pixels the teacher saw
    label: int  # the class the generator was asked for
    logits: np.ndarray  # the teacher's logits on ``image``, [num_classes]; stored as float16
    meta: dict[str, Any] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    # The manifest's JSON style (strict: no NaN). A module-level name so tests can stand a crash in for it.
    write_json_atomic(path, value, indent=2, allow_nan=False)


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile writes, so the shard is read back zero times."""

    def __init__(self, handle: IO[bytes]):
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    # Fixed mtime, owner and mode: the same samples always give the same bytes.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info, io.BytesIO(data)


def _identity_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
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
                lines.extend(_identity_diff(old[key], new[key], path))
        return lines
    # Compare as JSON text so that true and 1, or 1 and 1.0, count as different.
    if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
        return [f"{prefix or '(identity)'}: {show(old)} in the existing dataset, {show(new)} now"]
    return []


def _is_own_leftover(path: Path) -> bool:
    """Files a killed writer may leave behind before its first manifest: safe to delete."""
    name = path.name
    if path.is_dir():
        return name == RESUME_DIR and all(_STATE_PATTERN.match(p.name) for p in path.iterdir())
    return name == MANIFEST_NAME + TMP_SUFFIX or bool(SHARD_PATTERN.match(name.removesuffix(TMP_SUFFIX)))


class ShardWriter:
    """Appends shards to a dataset directory; build it with :meth:`open`.

    Not safe for two processes writing the same directory at once (there is no lock); one run per ``--out``.
    """

    def __init__(self, out_dir: Path, manifest: dict[str, Any], shard_size: int, mixed_sizes: bool = False):
        # Private: use ShardWriter.open, which validates and cleans the directory first.
        self.out_dir = out_dir
        self._manifest = manifest
        self.shard_size = shard_size
        self.mixed_sizes = mixed_sizes  # images may differ in H×W (a multi-resolution method's)

    # ----------------------------------------------------------------------------------------- open

    @classmethod
    def open(cls, out_dir: str | os.PathLike[str], *, identity: dict[str, Any], header: dict[str, Any],
             target_samples: int, shard_size: int, image_shape: tuple[int, int, int] | None = None,
             num_classes: int | None = None, key_offset: int = 0, mixed_sizes: bool = False) -> ShardWriter:
        """Creates a dataset in ``out_dir`` or resumes the one there.

        ``identity`` is what must match for a later run to continue this dataset (method, teacher sha256,
        resolved config minus run-length fields); a different identity refuses and changes nothing on disk.
        ``header`` holds free-form top-level manifest blocks (``method``, ``teacher``, ...). ``image_shape``
        (H, W, C) and ``num_classes`` are optional up-front checks; otherwise the first shard fixes them.
        ``key_offset`` is the global index of this dataset's first sample: fan-out workers write disjoint key
        ranges (``[key_offset, key_offset + target_samples)``) so their parts merge without renumbering.
        ``mixed_sizes`` lets images differ in H×W (a multi-resolution method's); otherwise every image must have
        the first one's shape.
        """
        out = Path(out_dir)
        if not isinstance(target_samples, int) or target_samples < 1:
            raise ShardError(f"target_samples must be a positive integer, got {target_samples!r}")
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ShardError(f"shard_size must be a positive integer, got {shard_size!r}")
        if not isinstance(identity, dict) or not isinstance(header, dict):
            raise ShardError("identity and header must be dicts")
        identity = canonical_json(identity, "identity")
        header = canonical_json(header, "header")
        clash = sorted(_RESERVED & set(header))
        if clash:
            raise ShardError(f"header may not set the manifest's own fields: {', '.join(clash)}")
        if image_shape is not None:
            image_shape = tuple(int(v) for v in image_shape)  # type: ignore[assignment]
            if len(image_shape) != 3 or image_shape[2] not in (1, 3) or min(image_shape) < 1:
                raise ShardError(f"image_shape must be (H, W, C) with C 1 or 3, got {image_shape}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ShardError(f"num_classes must be a positive integer, got {num_classes!r}")
        if out.exists() and not out.is_dir():
            raise ShardError(f"{out} exists and is not a directory")
        if isinstance(key_offset, bool) or not isinstance(key_offset, int) or key_offset < 0:
            raise ShardError(f"key_offset must be a non-negative integer, got {key_offset!r}")

        manifest_path = out / MANIFEST_NAME
        if manifest_path.exists():
            writer = cls._resume(out, identity, header, target_samples, shard_size, image_shape, num_classes,
                                 mixed_sizes)
            if writer.key_offset != key_offset:  # the identity normally catches this first
                raise ShardError(f"{out}: its keys start at {writer.key_offset}, asked for {key_offset}")
            return writer

        if out.exists():
            foreign = sorted(p.name for p in out.iterdir() if not _is_own_leftover(p))
            if foreign:
                shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
                raise ShardError(f"{out} is not empty and holds no dataset manifest ({shown}); nothing was "
                                 "changed. Choose an empty or new directory.")
            for leftover in out.iterdir():  # only a killed writer's own files remain here
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ShardError(f"cannot create dataset directory {out}: {error}") from error
        now = _now()
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
            "created": now,
            "updated": now,
        }
        if key_offset:  # absent when 0, so plain datasets keep the manifest they always had
            manifest["key_offset"] = key_offset
        writer = cls(out, manifest, shard_size, mixed_sizes)
        # Claims the directory at once, so a run with another identity refuses even before the first shard.
        writer._commit_manifest(manifest, lambda error: f"cannot write {manifest_path}: {error}")
        return writer

    @classmethod
    def _resume(cls, out: Path, identity: dict[str, Any], header: dict[str, Any], target_samples: int,
                shard_size: int, image_shape: tuple[int, ...] | None, num_classes: int | None,
                mixed_sizes: bool) -> ShardWriter:
        manifest_path = out / MANIFEST_NAME
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ShardError(f"{manifest_path}: cannot read the dataset manifest ({error}); "
                             "nothing was changed") from None
        validate_manifest(manifest, str(manifest_path))
        # Every check that can refuse comes before the first change to the directory.
        diff = _identity_diff(manifest["identity"], identity)
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

        # Clean up what a killed run may have left: temporaries, shards never committed, stale states.
        listed = {entry["url"] for entry in manifest["shards"]}
        for path in out.iterdir():
            if path.is_file() and (path.name.endswith(TMP_SUFFIX)
                                   or (SHARD_PATTERN.match(path.name) and path.name not in listed)):
                path.unlink(missing_ok=True)
        resume_dir = out / RESUME_DIR
        if resume_dir.is_dir():
            for path in resume_dir.iterdir():
                if path.is_file() and f"{RESUME_DIR}/{path.name}" != manifest.get("resume_state"):
                    path.unlink(missing_ok=True)

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

        writer = cls(out, manifest, shard_size, mixed_sizes)
        writer._commit_manifest(apply_open_arguments, lambda error: f"cannot write {manifest_path}: {error}",
                                only_if_changed=True)
        return writer

    # ----------------------------------------------------------------------------------------- state

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as last committed."""
        return copy.deepcopy(self._manifest)

    @property
    def num_committed(self) -> int:
        """Samples in finished shards: the global index of the next sample, i.e. the resume point."""
        return int(self._manifest["num_samples"])

    @property
    def key_offset(self) -> int:
        """Global index of this dataset's first sample (0 unless it is a fan-out part)."""
        return int(self._manifest.get("key_offset", 0))

    @property
    def num_shards(self) -> int:
        return len(self._manifest["shards"])

    @property
    def target_samples(self) -> int:
        return int(self._manifest["target_samples"])

    @property
    def remaining(self) -> int:
        return max(0, self.target_samples - self.num_committed)

    @property
    def complete(self) -> bool:
        return bool(self._manifest["complete"])

    def load_resume_state(self) -> dict[str, Any] | None:
        """The state saved with the last committed shard (``torch.load(weights_only=True)``), or None."""
        rel = self._manifest.get("resume_state")
        if not rel:
            return None
        import torch  # lazy: reading and writing shards without resume states needs no torch

        path = self.out_dir / rel
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # any failure here means the same thing to the user
            raise ShardError(f"{path}: cannot load the resume state ({error}); delete {self.out_dir} "
                             "to start over") from error

    # ----------------------------------------------------------------------------------------- commit

    def _validate(self, samples: list[Sample]) -> tuple[list[Sample], list[int] | None, int | None]:
        """Checked, normalised copies of ``samples`` (float16 logits, resolution in meta); raises ShardError."""
        if not isinstance(samples, (list, tuple)) or not samples:
            raise ShardError("commit_shard needs a non-empty list of Sample")
        if len(samples) > self.shard_size:
            raise ShardError(f"{len(samples)} samples exceed shard_size {self.shard_size}")
        if self.num_committed + len(samples) > self.target_samples:
            raise ShardError(f"{len(samples)} more samples would exceed target_samples {self.target_samples} "
                             f"({self.num_committed} already stored)")
        shape = self._manifest["schema"]["image"]["shape"]
        num_classes = self._manifest.get("num_classes")
        checked: list[Sample] = []
        for i, sample in enumerate(samples):
            expected_key = sample_key(self.key_offset + self.num_committed + i)
            where = f"sample {i} of the shard (key {getattr(sample, 'key', '?')!r})"
            if not isinstance(sample, Sample):
                raise ShardError(f"{where}: expected shards.Sample, got {type(sample).__name__}")
            if sample.key != expected_key:
                raise ShardError(f"{where}: key must be the next global index {expected_key!r}; keys continue "
                                 f"from the {self.num_committed} samples already stored")
            image = sample.image
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
                    or image.shape[2] not in (1, 3):
                desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
                raise ShardError(f"{where}: image must be a uint8 H×W×C array with C 1 or 3, got {desc}")
            if shape is None:
                shape = list(image.shape)
            elif list(image.shape) != shape and not (self.mixed_sizes and image.shape[2] == shape[2]):
                raise ShardError(f"{where}: image shape {list(image.shape)} differs from the dataset's {shape}"
                                 + ("" if self.mixed_sizes else " (a set of several sizes needs mixed_sizes=True)"))
            logits = sample.logits
            if not isinstance(logits, np.ndarray) or logits.ndim != 1 or not np.issubdtype(logits.dtype,
                                                                                            np.floating):
                desc = f"{logits.dtype} {logits.shape}" if isinstance(logits, np.ndarray) else type(logits).__name__
                raise ShardError(f"{where}: logits must be a 1-D float array, got {desc}")
            if num_classes is None:
                num_classes = int(logits.shape[0])
            elif logits.shape[0] != num_classes:
                raise ShardError(f"{where}: {logits.shape[0]} logits, the dataset has {num_classes} classes")
            # Stored as float16 (the format's dtype); non-finite after the cast means overflow (|x| > 65504).
            with np.errstate(over="ignore"):  # overflow is reported below, as a ShardError
                logits16 = logits.astype("<f2")
            if not np.isfinite(logits16).all():
                raise ShardError(f"{where}: logits are not finite as float16 (NaN, inf or beyond ±65504)")
            label = sample.label
            if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)) \
                    or not 0 <= int(label) < num_classes:
                raise ShardError(f"{where}: label must be an int in [0, {num_classes}), got {label!r}")
            if not isinstance(sample.meta, dict):
                raise ShardError(f"{where}: meta must be a dict")
            meta = canonical_json(sample.meta, f"{where}: meta")
            meta.setdefault("resolution", [int(image.shape[0]), int(image.shape[1])])
            checked.append(Sample(sample.key, np.ascontiguousarray(image), int(label), logits16, meta))
        return checked, shape, num_classes

    def _serialise_state(self, state: dict[str, Any]) -> bytes:
        import torch  # lazy, see load_resume_state

        buffer = io.BytesIO()
        try:
            torch.save(state, buffer)
            # A state that weights_only loading refuses would only fail at resume time, hours later.
            torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
        except Exception as error:
            raise ShardError(f"resume state cannot be saved and loaded with weights_only=True ({error}); keep "
                             "it to tensors, numbers, strings and containers of those") from error
        return buffer.getvalue()

    def commit_shard(self, samples: list[Sample], state: dict[str, Any] | None = None,
                     seconds: float | None = None) -> None:
        """Writes ``samples`` as the next shard and, with it, the resume ``state`` (or clears it when None).
        ``seconds``, the wall time spent making these samples, is recorded with the shard; the summary's
        ``synthesis_seconds`` is their sum over all runs of this dataset (what a time budget counts)."""
        checked, shape, num_classes = self._validate(samples)
        state_bytes = self._serialise_state(state) if state is not None else None
        index = self.num_shards
        name = shard_name(index)
        final = self.out_dir / name
        hashing: _HashingWriter | None = None

        def write_tar(tmp: Path) -> None:
            nonlocal hashing
            with open(tmp, "wb") as handle:
                hashing = _HashingWriter(handle)
                with tarfile.open(fileobj=hashing, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
                    for sample in checked:
                        members = {
                            f"{sample.key}.{IMAGE_EXT}": encode_png(sample.image),
                            f"{sample.key}.{LABEL_EXT}": str(sample.label).encode("ascii"),
                            f"{sample.key}.{LOGITS_EXT}": encode_npy(sample.logits),
                            f"{sample.key}.{META_EXT}": encode_meta(sample.meta),
                        }
                        for member in sorted(members):
                            tar.addfile(*_tar_member(member, members[member]))

        try:
            write_atomic(final, write_tar)  # step 2: shard-XXXXXX.tar.tmp, fsync, rename, fsync(dir)
        except OSError as error:
            raise ShardError(f"{final}: could not write the shard ({error}); the dataset still ends after "
                             f"shard {index - 1 if index else 'none'}") from error
        assert hashing is not None

        state_rel = None
        if state_bytes is not None:  # step 3
            state_rel = f"{RESUME_DIR}/state-{index:06d}.pt"
            try:
                (self.out_dir / RESUME_DIR).mkdir(exist_ok=True)
                write_atomic(self.out_dir / state_rel, state_bytes)
            except OSError as error:
                final.unlink(missing_ok=True)
                raise ShardError(f"{self.out_dir / state_rel}: could not write the resume state for {name} "
                                 f"({error}); the shard was withdrawn") from error

        labels = np.array([s.label for s in checked], dtype=np.int64)
        logits = np.stack([s.logits for s in checked])
        agree, entropy_sum = logit_stats(labels, logits)
        shard_entry = {
            "url": name,
            "num_samples": len(checked),
            "bytes": hashing.size,
            "sha256": hashing.sha256.hexdigest(),
            "first_index": self.key_offset + self.num_committed,
            # Per-shard sums keep the summary exact across resumes and let verify recheck each shard.
            "agreement_count": agree,
            "entropy_sum": entropy_sum,
        }
        if seconds is not None:
            # Rounded up: what a time budget sums must never come out below what the deadline measured.
            shard_entry["synthesis_seconds"] = math.ceil(float(seconds) * 1000) / 1000
        previous_state = self._manifest.get("resume_state")

        def record_shard(manifest: dict[str, Any]) -> None:
            if manifest["schema"]["image"]["shape"] is None or manifest.get("num_classes") is None:
                manifest["schema"] = make_schema(shape, num_classes)
                manifest["num_classes"] = num_classes
                manifest["class_counts"] = [0] * int(num_classes or 0)
            manifest["shards"].append(shard_entry)
            manifest["num_samples"] = self.num_committed + len(checked)
            counts = np.bincount(labels, minlength=num_classes)
            manifest["class_counts"] = [int(a + b) for a, b in zip(manifest["class_counts"], counts, strict=True)]
            # Samples per meta "source" (synthetic, condensed, ...), so a reader knows the mix without decoding.
            sources = dict(manifest.get("source_counts") or {})
            for sample in checked:
                source = str(sample.meta.get("source", "unspecified"))
                sources[source] = sources.get(source, 0) + 1
            manifest["source_counts"] = dict(sorted(sources.items()))
            # Samples per image size; a set of several sizes lists them all in schema.image.shapes.
            sizes = dict(manifest.get("resolution_counts") or {})
            shapes = image_shapes(manifest)
            for sample in checked:
                h, w, c = (int(v) for v in sample.image.shape)
                sizes[size_key(h, w)] = sizes.get(size_key(h, w), 0) + 1
                if [h, w, c] not in shapes:
                    shapes.append([h, w, c])
            manifest["resolution_counts"] = dict(sorted(sizes.items()))
            if len(shapes) > 1:
                manifest["schema"]["image"]["shapes"] = sorted(shapes)
            manifest["summary"] = {**manifest["summary"], **summary_from_shards(manifest["shards"],
                                                                                manifest["num_samples"])}
            manifest["complete"] = False  # only finish() declares a dataset complete
            manifest.pop("stop", None)
            manifest["resume_state"] = state_rel

        def withdraw() -> None:
            final.unlink(missing_ok=True)
            if state_rel:
                (self.out_dir / state_rel).unlink(missing_ok=True)

        self._commit_manifest(  # step 4: the commit point
            record_shard,
            lambda error: f"{self.out_dir / MANIFEST_NAME}: could not record {name} ({error}); the shard "
                          "was withdrawn and the dataset is unchanged",
            on_failure=withdraw)
        if previous_state and previous_state != state_rel:  # step 5
            (self.out_dir / previous_state).unlink(missing_ok=True)

    def _commit_manifest(self, change: Callable[[dict[str, Any]], None] | dict[str, Any],
                         error_message: Callable[[OSError], str], *, on_failure: Callable[[], None] | None = None,
                         only_if_changed: bool = False) -> None:
        """The one way the manifest changes on disk and in memory (step 4 of the order at the top of this file).

        ``change`` edits a deep copy of the committed manifest in place, which then gets a fresh ``updated``
        stamp (with ``only_if_changed``, an edit that changes nothing writes nothing); or it is the complete
        first manifest of a new dataset, written as given. The result is written atomically (tmp, fsync,
        rename, fsync(dir)) and only then becomes ``self._manifest``. An OSError calls ``on_failure`` (which
        withdraws files written for this commit) and raises ShardError(``error_message(error)``); the
        committed manifest stays the previous one, on disk and here.
        """
        if isinstance(change, dict):
            manifest = change
        else:
            manifest = copy.deepcopy(self._manifest)
            change(manifest)
            if only_if_changed and manifest == self._manifest:
                return
            manifest["updated"] = _now()
        try:
            _write_json_atomic(self.out_dir / MANIFEST_NAME, manifest)
        except OSError as error:
            if on_failure is not None:
                on_failure()
            raise ShardError(error_message(error)) from error
        self._manifest = manifest

    # ----------------------------------------------------------------------------------------- extras

    def add_file(self, name: str, data: bytes | str | os.PathLike[str]) -> dict[str, Any]:
        """Stores an extra artifact (e.g. a learned prior) as ``out_dir/name``, atomically, and records it
        under ``manifest["artifacts"][name]`` with its size and sha256. ``data`` is bytes or a file to copy.
        Returns the manifest entry."""
        if not _ARTIFACT_NAME.match(name) or name.endswith(TMP_SUFFIX) or name in (MANIFEST_NAME, RESUME_DIR) \
                or SHARD_PATTERN.match(name):
            raise ShardError(f"artifact name {name!r} must be a plain file name that is not manifest.json, "
                             f"resume, a shard name or *{TMP_SUFFIX}")
        try:
            payload = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else Path(data).read_bytes()
        except OSError as error:
            raise ShardError(f"cannot read artifact source {data!r}: {error}") from error
        entry = {"url": name, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}

        def message(error: OSError) -> str:
            return f"{self.out_dir / name}: could not store the artifact ({error})"

        try:
            write_atomic(self.out_dir / name, payload)
        except OSError as error:
            raise ShardError(message(error)) from error

        def record_artifact(manifest: dict[str, Any]) -> None:
            manifest.setdefault("artifacts", {})[name] = entry

        self._commit_manifest(record_artifact, message)
        return dict(entry)

    def finish(self, summary: dict[str, Any] | None = None, stop: dict[str, Any] | None = None) -> dict[str, Any]:
        """Marks the dataset complete, merges the caller's ``summary`` figures (e.g. diversity) into the
        manifest's summary and returns the final manifest.

        Without ``stop`` the dataset holds what was asked for and the resume state is dropped. With ``stop``
        (why the run ended early, e.g. ``{"reason": "time_budget", ...}``, recorded as ``manifest["stop"]``)
        it is a complete, usable dataset of the shards so far, and the resume state is kept, so that a later
        run asking for more continues exactly where this one stopped."""
        extra = canonical_json(summary or {}, "summary")
        stop = canonical_json(stop, "stop") if stop is not None else None

        def complete(manifest: dict[str, Any]) -> None:
            # teacher_agreement and mean_entropy always come from the stored logits, never from the caller.
            manifest["summary"] = {**manifest["summary"], **extra,
                                   **summary_from_shards(manifest["shards"], manifest["num_samples"])}
            manifest["complete"] = True
            manifest["stop"] = stop
            if stop is None:
                manifest["resume_state"] = None

        self._commit_manifest(
            complete, lambda error: f"{self.out_dir / MANIFEST_NAME}: could not finish the dataset ({error})")
        if stop is None:
            shutil.rmtree(self.out_dir / RESUME_DIR, ignore_errors=True)
        return self.manifest

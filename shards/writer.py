"""Crash-safe shard writer: the only code that creates or changes a dataset directory.

A run killed at any moment leaves a valid dataset made of the shards finished so far, and :meth:`ShardWriter.open`
on the same directory resumes it. The order of operations in :meth:`ShardWriter.commit_shard` makes this true:

1. validate every sample and the resume state (nothing touches the disk before this passes);
2. write ``shard-XXXXXX.tar`` to a temporary, fsync, rename;
3. write ``resume/state-XXXXXX.pt`` the same way (only when a state is given);
4. write ``manifest.json`` the same way, then fsync the directory — **the commit point**
   (:meth:`ShardWriter._commit_manifest`, the only code that changes the manifest);
5. delete the previous resume state (and a set-up's progress: the set-up is over).

Steps 2-4 each go through :func:`atomicio.write_atomic` (a temporary, fsync, rename, fsync the directory;
the temporary is removed on any error), so only a hard kill leaves ``*.tmp`` files, which ``open`` deletes.
Opening (create or resume, refusals, clean-up) is :mod:`shards.opening`; sample checks are :mod:`shards.samples`.
A writer holds the folder's lock (:mod:`shards.lock`) from ``open`` to :meth:`ShardWriter.close`.

Before step 4 the new shard is an orphan that readers never see (they read only what the manifest lists) and
that the next ``open`` deletes; after it the shard is part of the dataset. Image shape and ``num_classes`` are
fixed by the first committed shard unless given to ``open`` up front (do that when you know them: a mistake
then fails before hours of synthesis rather than after).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from atomicio import TMP_SUFFIX, write_atomic, write_json_atomic

from .format import (
    IMAGE_EXT,
    LABEL_EXT,
    LOGITS_EXT,
    MANIFEST_NAME,
    META_EXT,
    RESUME_DIR,
    SHARD_PATTERN,
    ShardError,
    canonical_json,
    encode_meta,
    encode_npy,
    encode_png,
    image_shapes,
    logit_stats,
    make_schema,
    shard_name,
    size_key,
    summary_from_shards,
)
from .lock import FolderLock
from .opening import now, open_dataset
from .owned import remove_resume_folder, remove_state, resume_folder
from .samples import Sample, check_samples
from .states import load_state, serialise_state
from .tario import HashingWriter, tar_member

_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    # The manifest's JSON style (strict: no NaN). A module-level name so tests can stand a crash in for it.
    write_json_atomic(path, value, indent=2, allow_nan=False)


class ShardWriter:
    """Appends shards to a dataset directory; build it with :meth:`open`, let go of it with :meth:`close`
    (or ``with ShardWriter.open(...) as writer``). One writer per folder: it holds the folder's lock."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any], shard_size: int, mixed_sizes: bool = False, *,
                 lock: FolderLock | None = None):
        # Private: use ShardWriter.open, which validates, locks and cleans the directory first.
        self.out_dir = out_dir
        self._manifest = manifest
        self.shard_size = shard_size
        self.mixed_sizes = mixed_sizes  # images may differ in H×W (a multi-resolution method's)
        self._lock = lock

    @classmethod
    def open(cls, out_dir: str | os.PathLike[str], *, identity: dict[str, Any], header: dict[str, Any],
             target_samples: int, shard_size: int, image_shape: tuple[int, int, int] | None = None,
             num_classes: int | None = None, key_offset: int = 0, mixed_sizes: bool = False) -> ShardWriter:
        """Creates a dataset in ``out_dir`` or resumes the one there, and locks the folder.

        ``identity`` is what must match for a later run to continue this dataset (method, teacher sha256,
        resolved config minus run-length fields); a different identity refuses and changes nothing on disk.
        ``header`` holds free-form top-level manifest blocks (``method``, ``teacher``, ...). ``image_shape``
        (H, W, C) and ``num_classes`` are optional up-front checks; otherwise the first shard fixes them.
        ``key_offset`` is the global index of this dataset's first sample: fan-out workers write disjoint key
        ranges (``[key_offset, key_offset + target_samples)``) so their parts merge without renumbering.
        ``mixed_sizes`` lets images differ in H×W (a multi-resolution method's); otherwise every image must have
        the first one's shape. A non-empty folder without a manifest, a folder another writer holds (the error
        names its pid) and a symlinked ``resume`` folder are refused, with nothing changed.
        """
        return open_dataset(cls, out_dir, identity=identity, header=header, target_samples=target_samples,
                            shard_size=shard_size, image_shape=image_shape, num_classes=num_classes,
                            key_offset=key_offset, mixed_sizes=mixed_sizes)

    def close(self) -> None:
        """Lets go of the folder's lock; the writer cannot commit afterwards. Safe to call twice."""
        lock = getattr(self, "_lock", None)  # __del__ may meet a writer whose __init__ never finished
        if lock is not None:
            lock.release()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._lock is not None and not self._lock.held:
            raise ShardError(f"{self.out_dir}: this writer was closed; open the folder again to write to it")

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
        return load_state(self.out_dir / rel, self.out_dir) if rel else None

    # ----------------------------------------------------------------------------------------- commit

    def commit_shard(self, samples: list[Sample], state: dict[str, Any] | None = None,
                     seconds: float | None = None) -> None:
        """Writes ``samples`` as the next shard and, with it, the resume ``state`` (or clears it when None).
        ``seconds``, the wall time spent making these samples, is recorded with the shard; the summary's
        ``synthesis_seconds`` is their sum over all runs of this dataset (what a time budget counts)."""
        self._check_open()
        checked, shape, num_classes = check_samples(
            samples, self._manifest, shard_size=self.shard_size, target_samples=self.target_samples,
            num_committed=self.num_committed, key_offset=self.key_offset, mixed_sizes=self.mixed_sizes)
        state_bytes = serialise_state(state) if state is not None else None
        index = self.num_shards
        name = shard_name(index)
        final = self.out_dir / name
        hashing: HashingWriter | None = None

        def write_tar(tmp: Path) -> None:
            nonlocal hashing
            with open(tmp, "wb") as handle:
                hashing = HashingWriter(handle)
                with tarfile.open(fileobj=hashing, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
                    for sample in checked:
                        members = {
                            f"{sample.key}.{IMAGE_EXT}": encode_png(sample.image),
                            f"{sample.key}.{LABEL_EXT}": str(sample.label).encode("ascii"),
                            f"{sample.key}.{LOGITS_EXT}": encode_npy(sample.logits),
                            f"{sample.key}.{META_EXT}": encode_meta(sample.meta),
                        }
                        for member in sorted(members):
                            tar.addfile(*tar_member(member, members[member]))

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
                resume_folder(self.out_dir).mkdir(exist_ok=True)  # refuses one that became a symlink meanwhile
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
        previous_prepare = self._manifest.get("prepare_state")

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
            manifest.pop("prepare_state", None)  # the set-up is over: its seconds are in this shard's

        def withdraw() -> None:
            final.unlink(missing_ok=True)
            if state_rel:
                (self.out_dir / state_rel).unlink(missing_ok=True)

        self._commit_manifest(  # step 4: the commit point
            record_shard,
            lambda error: f"{self.out_dir / MANIFEST_NAME}: could not record {name} ({error}); the shard "
                          "was withdrawn and the dataset is unchanged",
            on_failure=withdraw)
        for stale in {previous_state, (previous_prepare or {}).get("url")} - {state_rel}:  # step 5
            remove_state(self.out_dir, stale)

    # ----------------------------------------------------------------------------------------- set-up

    @property
    def prepare_seconds(self) -> float:
        """Seconds that earlier runs spent in a method's set-up and that no shard counts yet."""
        entry = self._manifest.get("prepare_state")
        return float(entry["seconds"]) if entry else 0.0

    def load_prepare_state(self) -> dict[str, Any] | None:
        """The set-up progress a killed run saved last (:meth:`save_prepare_state`), or None."""
        entry = self._manifest.get("prepare_state")
        return load_state(self.out_dir / entry["url"], self.out_dir) if entry else None

    def save_prepare_state(self, state: dict[str, Any], seconds: float) -> None:
        """Keeps the progress of a method's set-up before its first shard (D2CIP's stage 1) and the ``seconds`` spent
        on it over all runs, so that a killed run continues it: a new ``resume/prepare-NNNNNN.pt``, the manifest
        (the commit point), the previous file deleted. The first shard, or a finished dataset, drops it."""
        self._check_open()
        data = serialise_state(state)
        previous = self._manifest.get("prepare_state")
        index = int(previous["url"][-9:-3]) + 1 if previous else 0  # validated: resume/prepare-NNNNNN.pt
        rel = f"{RESUME_DIR}/prepare-{index:06d}.pt"
        path = self.out_dir / rel
        try:
            resume_folder(self.out_dir).mkdir(exist_ok=True)  # refuses one that became a symlink meanwhile
            write_atomic(path, data)
        except OSError as error:
            raise ShardError(f"{path}: could not save the set-up's progress ({error}); the last is kept") from error
        entry = {"url": rel, "seconds": math.ceil(float(seconds) * 1000) / 1000}
        self._commit_manifest(lambda manifest: manifest.update(prepare_state=entry),
                              lambda error: f"{self.out_dir / MANIFEST_NAME}: could not record {rel} ({error})",
                              on_failure=lambda: path.unlink(missing_ok=True))
        if previous:
            remove_state(self.out_dir, previous["url"])

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
            manifest["updated"] = now()
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
        self._check_open()
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
        self._check_open()
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
                manifest.pop("prepare_state", None)

        self._commit_manifest(
            complete, lambda error: f"{self.out_dir / MANIFEST_NAME}: could not finish the dataset ({error})")
        if stop is None:
            remove_resume_folder(self.out_dir)
        return self.manifest

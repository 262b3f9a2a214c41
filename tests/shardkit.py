"""Helpers shared by the dataset-format tests (tests/test_shards*.py, tests/test_untrusted*.py): samples whose
content depends only on their index, small datasets written through the public writer, digests of folders."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

import shards
from shards.format import encode_npy, encode_png, make_schema

NUM_CLASSES = 5
IDENTITY = {"method": "toy", "teacher_sha256": "ab" * 32, "config": {"lr": 0.1, "steps": 3}}
HEADER = {"method": {"name": "toy", "seed": 0}, "teacher": {"arch": "lenet5", "class_names": list("abcde")}}
REPO = Path(__file__).resolve().parents[1]


def make_samples(start: int, count: int, shape: tuple[int, int, int] = (8, 8, 3)) -> list[shards.Sample]:
    """Samples whose content depends only on their global index, so a resumed run makes the same ones."""
    out = []
    for index in range(start, start + count):
        rng = np.random.default_rng(index)
        out.append(shards.Sample(
            key=f"{index:09d}",
            image=rng.integers(0, 256, size=shape, dtype=np.uint8),
            label=int(rng.integers(NUM_CLASSES)),
            logits=(rng.normal(size=NUM_CLASSES) * 3).astype(np.float16),
            meta={"source": "synthetic", "stage": index % 2},
        ))
    return out


def write_dataset(out: Path, sizes: tuple[int, ...] = (4, 4, 3), shape: tuple[int, int, int] = (8, 8, 3),
                  finish: bool = True) -> list[shards.Sample]:
    writer = shards.ShardWriter.open(out, identity=IDENTITY, header=HEADER, target_samples=sum(sizes),
                                     shard_size=max(sizes))
    written: list[shards.Sample] = []
    for size in sizes:
        batch = make_samples(len(written), size, shape)
        writer.commit_shard(batch)
        written += batch
    if finish:
        writer.finish({"diversity": 0.25})
    writer.close()
    return written


def dir_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def expected_stats(samples: list[shards.Sample]) -> tuple[float, float]:
    logits = np.stack([s.logits for s in samples]).astype(np.float64)
    labels = np.array([s.label for s in samples])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    entropy = -(p * np.log(p)).sum(1)
    return float((np.stack([s.logits for s in samples]).argmax(1) == labels).mean()), float(entropy.mean())


# --------------------------------------------------------------------------------------------- hostile sets


def sample_members(key: str, image: np.ndarray, label: int, logits: np.ndarray,
                   meta: dict | None = None) -> list[tuple[str, bytes]]:
    """The tar members the writer makes for one sample, as (name, bytes), so a test can rename or alter them."""
    members = [(f"{key}.cls", str(label).encode("ascii")), (f"{key}.json", json.dumps(meta or {}).encode()),
               (f"{key}.logits.npy", encode_npy(np.asarray(logits, dtype=np.float16))),
               (f"{key}.png", encode_png(image))]
    return sorted(members)


def forge_dataset(out: Path, shard_members: list[list[tuple[str, bytes]]], *, shape: tuple[int, int, int] = (8, 8, 3),
                  num_classes: int = NUM_CLASSES, first_index: bool = True, **fields: Any) -> dict[str, Any]:
    """A dataset written by hand, as a stranger could: each shard a tar of exactly ``shard_members`` with a
    correct size and sha256 in a manifest that validates (``fields`` override its top-level fields)."""
    out.mkdir(parents=True, exist_ok=True)
    entries, labels, start = [], [], 0
    for index, members in enumerate(shard_members):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        data = buffer.getvalue()
        name = f"shard-{index:06d}.tar"
        (out / name).write_bytes(data)
        keys = {member.split(".", 1)[0] for member, _ in members}
        labels += [int(payload) for member, payload in members if member.endswith(".cls")]
        entry = {"url": name, "num_samples": len(keys), "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest()}
        if first_index:
            entry["first_index"] = start
        entries.append(entry)
        start += len(keys)
    manifest = {"format": shards.FORMAT_NAME, "format_version": shards.FORMAT_VERSION, "identity": IDENTITY,
                "schema": make_schema(shape, num_classes), "num_classes": num_classes, "target_samples": start,
                "shard_size": max(e["num_samples"] for e in entries), "num_samples": start, "complete": True,
                "class_counts": np.bincount(labels, minlength=num_classes).tolist(), "shards": entries,
                "summary": {}, "artifacts": {}, "resume_state": None, **fields}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest

"""The dataset contract in one place: format constants, the error type, sample codecs, summary statistics.

Both :mod:`shards.writer` and :mod:`shards.reader` import from here (and the manifest's validation from
:mod:`shards.validation`), so what the writer produces and what the reader accepts cannot drift apart.
Everything a sample holds is encoded without pickle (PNG, ``.npy`` with ``allow_pickle=False``, ASCII ``.cls``,
JSON): a shard from a stranger is data, not code.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
from PIL import Image

FORMAT_NAME = "dfkd-shards"
FORMAT_VERSION = 1
#: Versions this code can read. A newer writer bumps FORMAT_VERSION; old readers then refuse clearly.
READABLE_VERSIONS: tuple[int, ...] = (1,)
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = re.compile(r"^shard-(\d{6,})\.tar$")
#: Where a writer keeps the state it resumes from, and the only names it stores there.
RESUME_DIR = "resume"
STATE_PATTERN = re.compile(r"^state-\d{6,}\.pt$")  # the state saved with a shard
PREPARE_PATTERN = re.compile(r"^prepare-\d{6,}\.pt$")  # a method's set-up progress, before the first shard
#: The lock file every writer holds in the folder it writes (:mod:`shards.lock`).
LOCK_NAME = ".dfkd-shards.lock"
KEY_WIDTH = 9

IMAGE_EXT = "png"
LABEL_EXT = "cls"
LOGITS_EXT = "logits.npy"
META_EXT = "json"
SAMPLE_EXTS = (IMAGE_EXT, LABEL_EXT, LOGITS_EXT, META_EXT)
#: The most pixels (H × W) one stored image may have: 2048², far above what a classifier teacher takes. Readers
#: check it (and the manifest's declared shape) from the PNG header before any pixel is decompressed, so a small
#: shard of huge blank images cannot make them allocate gigabytes; the writer refuses larger images.
MAX_IMAGE_PIXELS = 2048 * 2048

class ShardError(Exception):
    """A dataset directory, manifest or shard that cannot be used as asked; the message names the file."""


@dataclass(frozen=True)
class Problem:
    """One thing :func:`shards.verify` found wrong: which file (shard name or ``manifest.json``) and what."""

    shard: str
    message: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.message}"


def tool_version() -> str:
    try:
        return metadata.version("dfkd-toolkit")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0.1.0"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:0{KEY_WIDTH}d}"


def make_schema(image_shape: list[int] | tuple[int, ...] | None, num_classes: int | None) -> dict[str, Any]:
    """The manifest's ``schema`` block. Shapes are ``None`` while a fresh dataset holds no shard yet."""
    return {
        "image": {"ext": IMAGE_EXT, "dtype": "uint8",
                  "shape": None if image_shape is None else [int(v) for v in image_shape],
                  "value_range": [0, 255]},
        "label": {"ext": LABEL_EXT, "dtype": "int64"},
        "logits": {"ext": LOGITS_EXT, "dtype": "float16",
                   "shape": None if num_classes is None else [int(num_classes)]},
        "meta": {"ext": META_EXT},
    }


def image_shapes(manifest: dict[str, Any]) -> list[list[int]]:
    """Every image shape [H, W, C] a dataset holds: ``schema.image.shapes`` for a set of several sizes (a
    multi-resolution method's), else the one ``schema.image.shape`` (none while the set is empty)."""
    image = manifest["schema"]["image"]
    if image.get("shapes"):
        return [[int(v) for v in shape] for shape in image["shapes"]]
    return [[int(v) for v in image["shape"]]] if image.get("shape") else []


def size_key(height: int, width: int) -> str:
    """How ``resolution_counts`` names an image size: ``"28x28"``."""
    return f"{int(height)}x{int(width)}"


def canonical_json(value: Any, what: str) -> Any:
    """``value`` as it will read back from JSON (tuples become lists), or ShardError if it is not JSON data."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ShardError(f"{what} must be plain JSON data (dict/list/str/int/float/bool/None): {error}") from None


# --------------------------------------------------------------------------------------------- codecs


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 H×W×C image (C=1 greyscale, C=3 RGB); same pixels always give the same bytes."""
    # 2-D uint8 maps to mode L and H×W×3 uint8 to RGB (fromarray's mode= argument is deprecated).
    pil = Image.fromarray(np.ascontiguousarray(image[:, :, 0] if image.shape[2] == 1 else image))
    buffer = io.BytesIO()
    # Fixed settings (and no time or text chunks, which Pillow omits unless asked) keep shards reproducible.
    pil.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def decode_png(data: bytes, shape: list[int] | None = None, shapes: list[list[int]] | None = None) -> np.ndarray:
    """H×W×C uint8 array from PNG bytes; only PNG is accepted so a shard cannot feed PIL an exotic format.

    The header's size is checked against :data:`MAX_IMAGE_PIXELS` and, with ``shape`` (or ``shapes``, the sizes
    a multi-resolution set allows), against the manifest, before any pixel is decompressed: a hostile shard
    cannot make the reader inflate a huge image.
    """
    with Image.open(io.BytesIO(data), formats=("PNG",)) as pil:
        if pil.mode not in ("L", "RGB"):
            raise ValueError(f"PNG mode {pil.mode!r} is neither L (greyscale) nor RGB")
        if pil.width * pil.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"a {pil.height}×{pil.width} image has {pil.width * pil.height} pixels, more than the "
                             f"{MAX_IMAGE_PIXELS} pixels per image this format allows")
        if shape is not None:
            found = [pil.height, pil.width, 1 if pil.mode == "L" else 3]
            if found != list(shape):
                raise ValueError(f"image shape {found} differs from the manifest's {list(shape)}")
        if shapes and len(shapes) > 1:
            found = [pil.height, pil.width, 1 if pil.mode == "L" else 3]
            if found not in [list(v) for v in shapes]:
                raise ValueError(f"image shape {found} is none of the manifest's {[list(v) for v in shapes]}")
        pil.load()
        array = np.asarray(pil, dtype=np.uint8)
        return array[:, :, None] if pil.mode == "L" else array


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@functools.lru_cache(maxsize=64)
def _float16_npy_header(length: int) -> bytes:
    data = encode_npy(np.zeros(length, dtype="<f2"))
    return data[: len(data) - 2 * length]


def decode_logits(data: bytes, num_classes: int | None) -> np.ndarray:
    """Logits from ``.npy`` bytes. When the header is byte-for-byte the one numpy writes for float16
    [num_classes] (always, for shards from this writer) the payload is read directly: ``np.load`` parses the
    header with ``ast.literal_eval``, which costs more than decoding the sample's PNG."""
    if num_classes:
        header = _float16_npy_header(num_classes)
        if len(data) == len(header) + 2 * num_classes and data.startswith(header):
            return np.frombuffer(data, dtype="<f2", offset=len(header)).copy()
    return decode_npy(data)


def encode_meta(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


# --------------------------------------------------------------------------------------------- statistics


def logit_stats(labels: np.ndarray, logits: np.ndarray) -> tuple[int, float]:
    """(number of samples whose argmax logit equals the label, sum of softmax entropies in nats).

    Sums rather than means so shards can be combined exactly; computed in float64 from the stored float16
    logits, so a reader recomputing them from the shards gets the same figures.
    """
    if len(labels) == 0:
        return 0, 0.0
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    entropy = -(np.exp(log_p) * log_p).sum(axis=1)
    agree = int((np.argmax(logits, axis=1) == np.asarray(labels)).sum())
    return agree, float(math.fsum(entropy.tolist()))


def summary_from_shards(shards: list[dict[str, Any]], num_samples: int) -> dict[str, Any]:
    """teacher_agreement, mean_entropy, bytes_per_sample and (when shards record it) the total
    synthesis_seconds, from the per-shard figures the writer records."""
    if num_samples == 0:
        return {"teacher_agreement": None, "mean_entropy": None, "bytes_per_sample": None}
    agree = sum(int(e.get("agreement_count", 0)) for e in shards)
    entropy = math.fsum(float(e.get("entropy_sum", 0.0)) for e in shards)
    size = sum(int(e["bytes"]) for e in shards)
    summary = {"teacher_agreement": agree / num_samples, "mean_entropy": entropy / num_samples,
               "bytes_per_sample": size / num_samples}
    timed = [float(e["synthesis_seconds"]) for e in shards if "synthesis_seconds" in e]
    if timed:
        summary["synthesis_seconds"] = round(math.fsum(timed), 3)
    return summary


def spent_seconds(manifest: dict[str, Any]) -> float:
    """Seconds every run of a dataset spent making it so far: its shards' (``summary.synthesis_seconds``) and an
    unfinished set-up's (``prepare_state.seconds``, D2CIP's stage 1 before the first shard): what a time budget
    has used, and what a continued benchmark run adds its own seconds to."""
    shards_seconds = float((manifest.get("summary") or {}).get("synthesis_seconds") or 0.0)
    return shards_seconds + float((manifest.get("prepare_state") or {}).get("seconds") or 0.0)

"""The dataset contract shared by ``synth`` (writes) and ``distill`` (reads).

A dataset directory is ``manifest.json`` plus WebDataset tar shards ``shard-000000.tar`` …, one sample per
key (``KEY.png``, ``KEY.cls``, ``KEY.logits.npy``, ``KEY.json``). :class:`ShardWriter` writes it crash-safely,
one writer per folder (it holds the folder's lock); :func:`read_manifest`, :func:`load_arrays`, :func:`stream`
and :func:`verify` read it and refuse anything that does not match the manifest. See ``shards/README.md`` for
the format and its threat model.

``import shards`` does not import torch: the writer loads it only for resume states, and :func:`stream`
(webdataset imports torch) only when called.
"""

from typing import TYPE_CHECKING, Any

from .decoding import decode_sample
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_IMAGE_PIXELS,
    READABLE_VERSIONS,
    Problem,
    ShardError,
    image_shapes,
    size_key,
    spent_seconds,
)
from .manifests import read_artifact, read_manifest, shard_urls
from .reader import ShardArrays, check_shard, load_arrays, resize_image, stream
from .samples import Sample
from .summary import sample_grid_png, summarize
from .verify import iter_samples, verify
from .writer import ShardWriter

if TYPE_CHECKING:
    from .streaming import ShardStream

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_IMAGE_PIXELS",
    "READABLE_VERSIONS",
    "Problem",
    "Sample",
    "ShardArrays",
    "ShardError",
    "ShardStream",
    "ShardWriter",
    "check_shard",
    "decode_sample",
    "image_shapes",
    "iter_samples",
    "load_arrays",
    "read_artifact",
    "read_manifest",
    "resize_image",
    "sample_grid_png",
    "shard_urls",
    "size_key",
    "spent_seconds",
    "stream",
    "summarize",
    "verify",
]


def __getattr__(name: str) -> Any:
    # ShardStream lives with webdataset (and so torch); load it only when someone asks for the class.
    if name == "ShardStream":
        from .streaming import ShardStream

        return ShardStream
    raise AttributeError(f"module 'shards' has no attribute {name!r}")

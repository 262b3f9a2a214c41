"""The dataset contract shared by ``synth`` (writes) and ``distill`` (reads).

A dataset directory is ``manifest.json`` plus WebDataset tar shards ``shard-000000.tar`` …, one sample per
key (``KEY.png``, ``KEY.cls``, ``KEY.logits.npy``, ``KEY.json``). :class:`ShardWriter` writes it crash-safely;
:func:`read_manifest`, :func:`load_arrays`, :func:`stream` and :func:`verify` read it and refuse anything that
does not match the manifest. See ``shards/README.md`` for the format.

``import shards`` does not import torch: the writer loads it only for resume states, and :func:`stream`
(webdataset imports torch) only when called.
"""

from typing import TYPE_CHECKING, Any

from .decoding import decode_sample
from .format import FORMAT_NAME, FORMAT_VERSION, READABLE_VERSIONS, Problem, ShardError, image_shapes, size_key
from .reader import (
    ShardArrays,
    check_shard,
    load_arrays,
    read_artifact,
    read_manifest,
    resize_image,
    shard_urls,
    stream,
    verify,
)
from .summary import sample_grid_png, summarize
from .writer import Sample, ShardWriter

if TYPE_CHECKING:
    from .streaming import ShardStream

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
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
    "load_arrays",
    "read_artifact",
    "read_manifest",
    "resize_image",
    "sample_grid_png",
    "shard_urls",
    "size_key",
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

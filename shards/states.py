"""Saving and loading the states a writer keeps in ``resume/``: the one saved with each shard and a method's
set-up progress (:meth:`shards.ShardWriter.save_prepare_state`). Both are plain ``torch.save`` files that must load
with ``weights_only=True`` (a stranger's folder may hold them, so nothing in them may run code)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .format import ShardError


def serialise_state(state: dict[str, Any]) -> bytes:
    """``torch.save`` bytes of ``state``; ShardError when ``weights_only`` loading would refuse them, which would
    otherwise only show at resume time, hours later."""
    import torch  # lazy: reading and writing shards without states needs no torch

    buffer = io.BytesIO()
    try:
        torch.save(state, buffer)
        torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ShardError(f"resume state cannot be saved and loaded with weights_only=True ({error}); keep "
                         "it to tensors, numbers, strings and containers of those") from error
    return buffer.getvalue()


def load_state(path: Path, out_dir: Path) -> dict[str, Any]:
    """The state in ``path`` (``weights_only``); ShardError saying how to start over when it cannot be read."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure here means the same thing to the user
        raise ShardError(f"{path}: cannot load the resume state ({error}); delete {out_dir} "
                         "to start over") from error
    if not isinstance(state, dict):
        raise ShardError(f"{path}: the resume state is not a dictionary; delete {out_dir} to start over")
    return state

"""What a synthesis run saves so that a killed one continues, and how it is put back.

With every shard the runner saves the method's state, the random-number generators and the samples not yet
stored (:func:`rng_state`, :func:`pack`); a long set-up before the first batch (D2CIP's stage 1) saves its
progress through :class:`WriterArtifacts` every ``checkpoint_seconds``. A saved state comes from a folder that
may be a stranger's: it loads with ``weights_only`` (:mod:`shards.states`), and one that loads but does not fit
this run is a clear error (:func:`restored`), not a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

import shards
from timebudget import Clock, format_duration

T = TypeVar("T")


class WriterArtifacts:
    """Lets a method keep files (e.g. a learned prior) inside the dataset, and its set-up's progress in the
    dataset's ``resume/`` folder, through the shard writer."""

    def __init__(self, writer: shards.ShardWriter, out: Path, *, clock: Clock, checkpoint_seconds: float,
                 started: float, log: Callable[[str], None]):
        self.writer = writer
        self.out = out
        self.log = log
        self.clock = clock
        self.checkpoint_seconds = checkpoint_seconds  # RunOptions.checkpoint_seconds
        # Set-up seconds: those earlier runs saved with their progress, then this run's since ``started``.
        self.spent_before = writer.prepare_seconds
        self.started = started
        self.last_saved = clock()

    def path(self, name: str) -> Path | None:
        entry = self.writer.manifest.get("artifacts", {}).get(name)
        return self.out / entry["url"] if entry else None

    def save(self, name: str, write: Callable[[Path], None]) -> None:
        tmp = self.out / f".{name}.tmp"
        write(tmp)
        self.writer.add_file(name, tmp)
        tmp.unlink(missing_ok=True)

    def restore_progress(self, restore: Callable[[dict[str, Any]], T]) -> T | None:
        """``restore(state)`` of the set-up state a killed run saved last, with the random-number state of that
        moment; None (and nothing called) when there is none."""
        saved = self.writer.load_prepare_state()
        if saved is None:
            return None

        def apply() -> T:
            set_rng_state(saved["rng"])
            return restore(dict(saved["method"]))

        result = restored(self.out, "set-up progress", apply)
        self.log(f"{self.out}: continuing the set-up where a killed run saved it "
                 f"({format_duration(self.spent_before)} of it done)")
        return result

    def checkpoint(self, state: Callable[[], dict[str, Any]]) -> None:
        """Saves ``state()`` and the random-number state when the last save is ``checkpoint_seconds`` old."""
        now = self.clock()
        if now - self.last_saved < self.checkpoint_seconds:
            return
        self.writer.save_prepare_state({"method": state(), "rng": rng_state()},
                                       seconds=self.spent_before + now - self.started)
        self.last_saved = now


def restored(out: Path, what: str, apply: Callable[[], T]) -> T:
    """``apply()``, which loads a saved state into this run; one that does not fit (a damaged or foreign file that
    still loads as tensors) is a clear error, not a traceback."""
    try:
        return apply()
    except (LookupError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise shards.ShardError(f"{out}: the saved {what} does not fit this run ({error!r}); delete {out} to "
                                "start over") from error


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pack(pending: list[shards.Sample]) -> dict[str, Any]:
    if not pending:
        return {"count": 0}
    return {
        "count": len(pending),
        "keys": [int(s.key) for s in pending],
        "images": torch.from_numpy(np.stack([s.image for s in pending])),
        "labels": torch.tensor([s.label for s in pending]),
        "logits": torch.from_numpy(np.stack([s.logits for s in pending])),
        "meta": [dict(s.meta) for s in pending],
    }


def unpack(packed: dict[str, Any]) -> list[shards.Sample]:
    if not packed or packed["count"] == 0:
        return []
    return [
        shards.Sample(key=f"{key:09d}", image=packed["images"][i].numpy(), label=int(packed["labels"][i]),
                      logits=packed["logits"][i].numpy(), meta=packed["meta"][i])
        for i, key in enumerate(packed["keys"])
    ]

"""The few names every ``distill`` module shares: the error a user can cause, what a batch source and an
objective are, and the one precision switch. Kept apart so the loop, the sources and the objectives import
each other's contracts without importing each other."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, Protocol

import torch

import zoo
from distill.data import Batch


class DistillError(Exception):
    """A problem with how distill was asked to run (output folder, resume, shapes); shown without traceback."""


class BatchSource(Protocol):
    """What the loop trains from: ``len(source)`` batches per epoch, reproducible per ``epoch``."""

    num_samples: int

    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> Iterable[Batch]: ...


#: An objective maps (student logits as float32, the batch) to a scalar loss. It may also have ``name``,
#: ``parameters()`` (trained with the student), ``state_dict()``/``load_state_dict()`` (kept in the checkpoint)
#: and ``epoch_stats()`` (columns of the epoch's log row).
Objective = Callable[[torch.Tensor, Batch], torch.Tensor]


#: ``--precision`` of this process (auto | fp32 | bf16 | fp16), set by the CLI around a job with
#: :func:`precision`; read where autocast is entered, so the loop, the objectives and evaluation agree.
_PRECISION: ContextVar[str] = ContextVar("distill_precision", default="auto")


@contextmanager
def precision(name: str) -> Iterator[None]:
    """Runs the block's distill jobs at ``name``; ``zoo.Acceleration`` resolves it per device."""
    zoo.Acceleration(torch.device("cpu"), precision=name)  # an unknown name fails here, before any work
    token = _PRECISION.set(name)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def acceleration(device: torch.device) -> zoo.Acceleration:
    """The current ``--precision`` on ``device`` (auto: zoo.auto_precision)."""
    return zoo.Acceleration(device, precision=_PRECISION.get())


def autocast(device: torch.device, enabled: bool) -> Any:
    """Autocast at the current ``--precision`` when ``enabled`` (:func:`acceleration`); a no-op for fp32. The
    loss is computed on float32 logits by the callers."""
    return acceleration(device).autocast() if enabled else nullcontext()

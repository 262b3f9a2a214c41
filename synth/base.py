"""The protocol every synthesis method follows, and the registry that ``synth list`` reads.

A method is a small class: built from a teacher (:class:`zoo.Classifier`, pixel-space input) and its
config dataclass, it yields :class:`SynthBatch` objects from :meth:`SynthesisMethod.synthesize` forever;
the runner (:mod:`synth.runner`) decides how many it needs, stores them and checkpoints the method between
shards with :meth:`state_dict`. A method never touches the disk except through the :class:`Artifacts`
it is given (for files such as D2CIP's learned prior that belong inside the dataset).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from zoo import Classifier


@dataclass
class SynthConfig:
    """Options every method has. Method configs subclass this and add the paper's hyperparameters."""

    batch_size: int = field(default=256, metadata={"help": "images synthesised per batch"})


@dataclass
class SynthBatch:
    """One batch of synthetic images in pixel space [0, 1], NCHW, with the labels they were asked for."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str = "synthetic"  # recorded per sample: e.g. synthetic, condensed, prior-stage
    meta: dict[str, Any] = field(default_factory=dict)


class Artifacts(Protocol):
    """Where a method stores files that travel with the dataset (recorded in the manifest)."""

    def path(self, name: str) -> Path | None:
        """The stored file ``name``, if a previous run of this dataset already saved it."""

    def save(self, name: str, write: Callable[[Path], None]) -> None:
        """Atomically stores the file that ``write(tmp_path)`` produces under ``name``."""


class SynthesisMethod(abc.ABC):
    """Base class: subclasses set ``name``, ``summary``, ``config_class`` and implement :meth:`synthesize`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    config_class: ClassVar[type[SynthConfig]] = SynthConfig

    def __init__(self, teacher: Classifier, config: SynthConfig, device: torch.device):
        self.teacher = teacher
        self.config = config
        self.device = device

    def prepare(self, artifacts: Artifacts) -> None:
        """One-off work before the first batch (e.g. D2CIP's stage 1). Runs again after a resume."""
        return None  # most methods need none

    @abc.abstractmethod
    def synthesize(self) -> Iterator[SynthBatch]:
        """Yields batches forever; the runner stops asking when it has enough."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last yielded batch (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; stateless methods have nothing to restore."""
        return None

    def losses_of_last_step(self) -> dict[str, float]:
        """The named loss terms of the most recent optimisation step, for progress bars and tests."""
        return {}


METHODS: dict[str, type[SynthesisMethod]] = {}


def register(cls: type[SynthesisMethod]) -> type[SynthesisMethod]:
    """Class decorator that makes a method available to ``synth run``."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def config_to_dict(config: SynthConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)

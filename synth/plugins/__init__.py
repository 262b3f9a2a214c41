"""Loss plug-ins: one implementation of an extra objective that every generator-based method accepts.

A plug-in is a :class:`LossPlugin` subclass in one file of this package (or of an installed extension,
see :mod:`synth.registry`). Defining it registers it, and every method that accepts plug-ins
(:class:`~synth.inversion.GeneratorInversion` and its subclasses) gains its options on ``synth run METHOD``.
The condensed-data discriminator is the intended first one: ``synth run gmi --condensed X`` and
``synth run d2cip --condensed X`` then run the same code.

What a plug-in has, and when it is called:

* ``options_class`` -- a dataclass whose fields (each with ``metadata["help"]``) become command-line
  options and pipeline-file keys; :meth:`LossPlugin.enabled` says whether the given options switch it on.
  Only enabled plug-ins are built, and only their options enter the manifest and the dataset's identity,
  so a run without them writes exactly what it wrote before they existed;
* :meth:`~LossPlugin.check` -- once, with the teacher, before the run touches the disk: read the plug-in's
  input and refuse what does not fit (so a bad input leaves nothing behind);
* :meth:`~LossPlugin.extra_samples` / :meth:`~LossPlugin.initial_batches` -- samples the plug-in adds to the
  dataset on top of ``--num-images`` (the condensed images), stored first, once per dataset;
* :meth:`~LossPlugin.attach` -- once, with the host method (teacher, device, ``num_classes``); create
  parameters and optimisers here;
* :meth:`~LossPlugin.begin_batch` -- before each inverted batch; may return extra parameter groups that the
  host's update engine optimises with the step's terms;
* :meth:`~LossPlugin.losses` -- every step: named terms (:func:`synth.updates.term`), each declaring the
  groups it updates, added to the host's terms (a name clash is an error);
* :meth:`~LossPlugin.after_step` -- every step, after the host's update: the plug-in's own update (a
  discriminator step on detached features, with its own optimiser);
* :meth:`~LossPlugin.end_batch` -- after every stored batch; may return extra batches to store;
* :meth:`~LossPlugin.state_dict` / :meth:`~LossPlugin.load_state_dict` -- saved with the host's resume state.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    import zoo

    from ..base import SynthBatch
    from ..inversion import GeneratorInversion, InversionStep
    from ..updates import ParamGroup, Term


class LossPlugin(abc.ABC):
    """Base class of loss plug-ins; subclasses set ``name``, ``summary`` and ``options_class``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    options_class: ClassVar[type]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            from ..registry import register_plugin

            register_plugin(cls)

    def __init__(self, options: Any):
        self.options = options
        self.host: GeneratorInversion | None = None

    @classmethod
    @abc.abstractmethod
    def enabled(cls, options: Any) -> bool:
        """Whether these options switch the plug-in on (e.g. its input path was given)."""

    def check(self, teacher: zoo.Classifier) -> None:
        """Before the run touches the disk: read inputs and raise a user error if they do not fit ``teacher``."""
        return None

    def extra_samples(self) -> int:
        """Samples this plug-in adds to the dataset beyond ``--num-images`` (after :meth:`check`)."""
        return 0

    def initial_batches(self) -> list[SynthBatch]:
        """Batches stored before the first synthetic one, once per dataset (the resume state must say so)."""
        return []

    def attach(self, host: GeneratorInversion) -> None:
        """Called once by the host method; build parameters and optimisers on ``host.device`` here."""
        self.host = host

    def begin_batch(self, labels: torch.Tensor) -> dict[str, ParamGroup]:
        """Before each inverted batch; extra parameter groups for the host's update engine (usually none)."""
        return {}

    @abc.abstractmethod
    def losses(self, step: InversionStep) -> dict[str, Term]:
        """This step's terms, added to the host's objective."""

    def after_step(self, step: InversionStep) -> None:
        """After the host's update of this step: the plug-in's own optimisation, if it has one."""
        return None

    def end_batch(self, batch: SynthBatch) -> list[SynthBatch]:
        """After every stored batch; extra batches to store (none by default)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

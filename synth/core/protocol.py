"""The protocols of the inversion core: a synthesis method, one step of the generator loop, a loss plug-in.

A method is one class in one file (or folder) under ``synth/methods/``: built from a teacher
(:class:`zoo.Classifier`, pixel-space input) and its config dataclass, it yields :class:`SynthBatch` objects
from :meth:`SynthesisMethod.synthesize` forever; the runner (:mod:`synth.runner`) decides how many it needs,
stores them and checkpoints the method between shards with :meth:`~SynthesisMethod.state_dict`. Defining a
subclass with a ``name`` registers it (:mod:`synth.core.registry`); nothing else needs editing.

What every method shares is done here, once: the teacher is frozen, the BatchNorm-statistics hook is
attached when the config asks for BN matching, and the labels follow one class schedule. A method never
touches the disk except through the :class:`Artifacts` it is given (for files such as D2CIP's learned
prior that belong inside the dataset).

Loss plug-ins: one implementation of an extra objective that every generator-based method accepts.

A plug-in is a :class:`LossPlugin` subclass in one file (or folder) of ``synth/plugins/`` (or of an installed extension,
see :mod:`synth.core.registry`). Defining it registers it, and every method that accepts plug-ins
(:class:`~synth.core.inversion.GeneratorInversion` and its subclasses) gains its options on ``synth run METHOD``.
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
* :meth:`~LossPlugin.losses` -- every step: named terms (:func:`synth.core.updates.term`), each declaring the
  groups it updates, added to the host's terms (a name clash is an error);
* :meth:`~LossPlugin.after_step` -- every step, after the host's update: the plug-in's own update (a
  discriminator step on detached features, with its own optimiser);
* :meth:`~LossPlugin.end_batch` -- after every stored batch; may return extra batches to store;
* :meth:`~LossPlugin.state_dict` / :meth:`~LossPlugin.load_state_dict` -- saved with the host's resume state.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

import zoo
from timebudget import Deadline

from .hooks import BatchNormStatisticsHook
from .registry import register_method, register_plugin
from .updates import ParamGroup, Term


@dataclass
class SynthConfig:
    """Options every method has. Method configs subclass this and add the paper's hyperparameters.

    ``cpu_budget`` is the method's ``--preset cpu``: the iteration counts and batch sizes that make a run
    finish in minutes on a 2-core CPU (loss weights stay the paper's). It must be declared on the config
    class itself, not inherited: a subclass adds options (D2CIP's stage-1 iterations, say) that its parent's
    budget knows nothing about. A class without one refuses ``--preset cpu``.
    """

    cpu_budget: ClassVar[Mapping[str, Any] | None] = None

    batch_size: int = field(default=256, metadata={"help": "images synthesised per batch"})

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        # Every method's loss weights, checked once here: a negative weight turns a term into its opposite
        # (and --bn-weight -1 used to crash on a missing BN hook far into the run).
        negative = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name.endswith("_weight")
                    and isinstance(getattr(self, f.name), (int, float)) and getattr(self, f.name) < 0]
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {', '.join(negative)}")

    @classmethod
    def own_cpu_budget(cls) -> Mapping[str, Any] | None:
        """The CPU budget declared on this very class (``None`` if it only inherits one)."""
        return cls.__dict__.get("cpu_budget")


@dataclass
class SynthBatch:
    """One batch of synthetic images in pixel space [0, 1], NCHW, with the labels they were asked for."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str = "synthetic"  # recorded per sample: e.g. synthetic, condensed, prior-stage
    meta: dict[str, Any] = field(default_factory=dict)  # recorded with every sample of the batch
    sample_meta: list[dict[str, Any]] | None = None  # one dict per sample, recorded with that sample only


class Artifacts(Protocol):
    """Where a method stores files that travel with the dataset (recorded in the manifest)."""

    def path(self, name: str) -> Path | None:
        """The stored file ``name``, if a previous run of this dataset already saved it."""

    def save(self, name: str, write: Callable[[Path], None]) -> None:
        """Atomically stores the file that ``write(tmp_path)`` produces under ``name``."""

    def restore_progress(self, restore: Callable[[dict[str, Any]], Any]) -> Any:
        """``restore(state)`` of what a killed run's set-up last passed to :meth:`checkpoint` (the random-number
        state restored to that moment), returning what it returns; None when there is none. A state that does
        not fit is a clear error."""

    def checkpoint(self, state: Callable[[], dict[str, Any]]) -> None:
        """Offers the set-up's progress, called at every safe point; ``state()`` (tensors, numbers, strings and
        containers of those) is saved atomically every few minutes, not on every call."""


class SynthesisMethod(abc.ABC):
    """Base class of every method.

    Subclasses set ``name`` (registers the class), ``summary`` (one line for ``synth list``), ``paper`` (the
    citation ``--help`` shows) and ``config_class``, and implement :meth:`synthesize`. Methods that accept
    loss plug-ins (:mod:`synth.plugins`) set ``accepts_plugins``.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str] = ""
    config_class: ClassVar[type[SynthConfig]] = SynthConfig
    accepts_plugins: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if not issubclass(cls.config_class, SynthConfig):
                raise TypeError(f"method {cls.name!r}: config_class must subclass {SynthConfig.__qualname__}")
            register_method(cls)

    def __init__(self, teacher: zoo.Classifier, config: SynthConfig, device: torch.device,
                 plugins: Sequence[LossPlugin] = (), acceleration: zoo.Acceleration | None = None):
        if plugins and not self.accepts_plugins:
            names = ", ".join(p.name for p in plugins)
            raise ValueError(f"{self.name} does not take loss plug-ins ({names}): it has no generator objective")
        self.config = config
        self.device = device
        self.acceleration = acceleration or zoo.Acceleration(device, enabled=False)
        self.teacher = self.acceleration.module(teacher.eval().requires_grad_(False))
        self.grad_scaler = self.acceleration.grad_scaler()  # fp16 only: loss scaling for every update
        self.plugins = list(plugins)
        self.num_classes = teacher.num_classes
        self.channels, self.height, self.width = teacher.input_shape
        self.bn_hook = BatchNormStatisticsHook(teacher.network) if self.uses_bn_statistics() else None
        self.batches_done = 0
        self.last_losses: dict[str, float] = {}
        self.show_progress = False  # progress bars inside a method (D2CIP's stage 1); the runner sets it
        # The part of a --time-budget that prepare() may spend (the runner sets it; None: no budget), and what
        # prepare() reports back for the manifest (e.g. a stage 1 cut short by it).
        self.prepare_deadline: Deadline | None = None
        self.prepare_report: dict[str, Any] = {}

    @classmethod
    def identity_extras(cls, config: SynthConfig, teacher: zoo.Classifier) -> dict[str, Any]:
        """Inputs besides the config that make a dataset what it is (DiffDFKD: the diffusion model's id,
        revision and file hash), added to the dataset identity and the manifest's method section. Runs before
        anything is written: raises a :class:`~synth.errors.SynthError` when such an input is missing or does
        not fit the config or the teacher."""
        return {}

    @classmethod
    def planned_images(cls, config: SynthConfig) -> int | None:
        """The image count this config implies on its own (D2CIP's A.8 cycles), or ``None``."""
        return None

    @classmethod
    def fit_to_teacher(cls, config: SynthConfig, teacher: zoo.Classifier) -> None:
        """Fills, in place, options whose default depends on the teacher (K-Gen's resolutions: empty means
        "from the teacher's input size"), before the config is checked, planned or recorded. Most have none."""
        return None

    @classmethod
    def check(cls, teacher: zoo.Classifier, config: SynthConfig) -> None:
        """Refuses (with a :class:`~synth.errors.SynthError`) a teacher this config cannot use, before the run
        touches the disk, so that bad input leaves nothing behind. Most methods check nothing here."""
        return None

    @classmethod
    def stores_mixed_sizes(cls, config: SynthConfig) -> bool:
        """Whether this config yields batches of several image sizes (K-Gen's resolutions); the dataset then
        records them (``schema.image.shapes``, ``resolution_counts``)."""
        return False

    def uses_bn_statistics(self) -> bool:
        """Whether the BN-statistics hook is needed: by default, when the config weights BN matching."""
        return float(getattr(self.config, "bn_weight", 0.0)) > 0

    def next_labels(self) -> torch.Tensor:
        """Classes in round-robin order, so every class gets the same share of the dataset."""
        start = self.batches_done * self.config.batch_size
        labels = (torch.arange(self.config.batch_size) + start) % self.num_classes
        return labels.to(self.device)

    def prepare(self, artifacts: Artifacts) -> None:
        """One-off work before the first batch (e.g. D2CIP's stage 1). Runs again after a resume. A long one
        checks :meth:`prepare_time_is_up` at safe points and stops there (saying so in ``prepare_report``), and
        offers its progress to ``artifacts.checkpoint`` there, continuing with ``artifacts.restore_progress``."""
        return None  # most methods need none

    def prepare_time_is_up(self) -> bool:
        """Whether :meth:`prepare` has spent its share of the run's time budget (never without a budget)."""
        return self.prepare_deadline is not None and self.prepare_deadline.expired()

    @abc.abstractmethod
    def synthesize(self) -> Iterator[SynthBatch]:
        """Yields batches forever; the runner stops asking when it has enough."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last yielded batch (tensors and plain values only)."""
        return {"batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.batches_done = int(state["batches_done"])

    def losses_of_last_step(self) -> dict[str, float]:
        """The named loss terms of the most recent optimisation step, for progress bars and tests."""
        return self.last_losses


@dataclass
class InversionStep:
    """What one optimisation step computed, handed to :meth:`GeneratorInversion.losses` and plug-ins."""

    index: int  # step within the batch, from 0
    labels: torch.Tensor
    latents: torch.Tensor
    images: torch.Tensor  # generator output, pixel space
    views: list[torch.Tensor]  # what the teacher saw: one augmented batch per view
    teacher_logits: torch.Tensor  # on views[0], float32
    teacher_features: list[torch.Tensor]  # penultimate features, one tensor per view
    student_logits: torch.Tensor | None  # proxy student on views[0]; None until it has learnt anything
    instance_features: list[torch.Tensor] | None = None  # per view, when the method asks (CMI)
    student_features: torch.Tensor | None = None  # proxy student's penultimate features, when asked (CPSC)


class LossPlugin(abc.ABC):
    """Base class of loss plug-ins; subclasses set ``name``, ``summary`` and ``options_class``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    options_class: ClassVar[type]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            register_plugin(cls)

    def __init__(self, options: Any):
        self.options = options
        self.host: SynthesisMethod | None = None  # a GeneratorInversion

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

    def identity_extras(self) -> dict[str, Any]:
        """Inputs besides the options that make the dataset what it is (the condensed set's content hash),
        after :meth:`check`; recorded with the options in the dataset identity and the manifest."""
        return {}

    def initial_batches(self) -> list[SynthBatch]:
        """Batches stored before the first synthetic one, once per dataset (the resume state must say so)."""
        return []

    def attach(self, host: SynthesisMethod) -> None:
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

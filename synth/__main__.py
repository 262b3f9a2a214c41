"""``python -m synth …`` (and ``torchrun … -m synth run …``): the ``synth`` command."""

from .commands.cli import entry

entry()

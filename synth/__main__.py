"""``python -m synth …`` (and ``torchrun … -m synth run …``): the ``synth`` command."""

from synth.cli import main

main()

"""``python -m distill …`` (and ``torchrun … -m distill run …``): the ``distill`` command."""

from distill.cli import entry

entry()

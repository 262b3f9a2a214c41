"""Imports every method module so that each registers itself with :data:`synth.base.METHODS`."""

from . import d2cip, deepinversion, gmi  # noqa: F401

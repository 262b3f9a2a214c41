"""The one error type of :mod:`realdata`: something the user can fix (a spec, a path, a file)."""

from __future__ import annotations


class DataError(Exception):
    """A real dataset could not be named or read; the message says which file and what would fit."""

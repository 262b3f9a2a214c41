"""Errors raised by :mod:`zoo`.

Every problem a user can cause (an unknown architecture name, a checkpoint that does not fit the
architecture, a file that would need arbitrary code to unpickle, a device that is not there) raises
:class:`ZooError` with a message that names the file or the name involved and says what would fit.
Command-line tools turn it into a one-line ``Error: ...`` and exit code 1.
"""

from __future__ import annotations


class ZooError(Exception):
    """A model-zoo problem the user can fix (wrong name, wrong checkpoint, missing file)."""


class NormalizationWarning(UserWarning):
    """A teacher was loaded without known normalisation, so a default (mean 0.5, std 0.5) is assumed.

    Normalisation is part of a teacher's identity: the wrong mean/std silently costs accuracy. Pass
    ``mean``/``std`` explicitly or put them in the checkpoint's card to silence this warning.
    """

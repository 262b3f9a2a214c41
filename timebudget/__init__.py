"""Wall-time budgets, shared by both stages: ``synth run --time-budget 20m``, ``distill run --time-budget 1h``.

:func:`parse_duration` reads what a person types (``90s``, ``20m``, ``1h30m``, ``1.5h``, or plain seconds);
:class:`Deadline` answers "is the budget spent?" against a monotonic clock, counting time already spent by
earlier runs of the same job (a resumed synthesis continues its budget rather than starting a new one).

Every reading of time that a budget decision rests on goes through a *clock*, a function returning monotonic
seconds: :func:`system_clock` in a run, a :class:`ManualClock` in a test, which advances only when told. A test
that charges its work to a manual clock decides the same way on a fast and on a loaded machine.
Standard library only.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Clock", "Deadline", "ManualClock", "format_duration", "parse_duration", "system_clock"]

#: Monotonic seconds, from an arbitrary origin.
Clock = Callable[[], float]


def system_clock() -> float:
    """The machine's monotonic clock (``time.monotonic``)."""
    return time.monotonic()


class ManualClock:
    """A clock that moves only by :meth:`advance`: a test charges its work to it (e.g. seconds per batch)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} s)")
        self.now += seconds

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([hms])")


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``text``: ``"20m"``, ``"1h30m"``, ``"45s"``, ``"1.5h"`` or a number of seconds.

    Raises ``ValueError`` with the accepted forms for anything else, or for a duration that is not positive.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        compact = str(text).strip().lower().replace(" ", "")
        try:
            seconds = float(compact)
        except ValueError:
            parts = _PART.findall(compact)
            if not parts or "".join(number + unit for number, unit in parts) != compact:
                raise ValueError(f"cannot read the duration {text!r}; write it like 90s, 20m, 1h30m or 1.5h") from None
            seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if not seconds > 0:
        raise ValueError(f"a time budget must be positive, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m05s"``; ``42.3`` -> ``"42s"``."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@dataclass
class Deadline:
    """A budget of ``seconds`` (``None``: unlimited), ``already_spent`` of it used before this process started,
    read on ``clock``."""

    seconds: float | None
    already_spent: float = 0.0
    clock: Clock = field(default=system_clock, repr=False, compare=False)
    _started: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._started = self.clock()

    def elapsed(self) -> float:
        """Seconds used so far, earlier runs included."""
        return self.already_spent + (self.clock() - self._started)

    def credit(self, seconds: float) -> None:
        """Gives back ``seconds`` just spent on work the budget does not cover (e.g. a benchmark's evaluation)."""
        self.already_spent -= seconds

    def remaining(self) -> float | None:
        return None if self.seconds is None else max(0.0, self.seconds - self.elapsed())

    def expired(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

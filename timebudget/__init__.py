"""Wall-time budgets, shared by both stages: ``synth run --time-budget 20m``, ``distill run --time-budget 1h``.

:func:`parse_duration` reads what a person types (``90s``, ``20m``, ``1h30m``, ``1.5h``, or plain seconds);
:class:`Deadline` answers "is the budget spent?" against a monotonic clock, counting time already spent by
earlier runs of the same job (a resumed synthesis continues its budget rather than starting a new one).
Standard library only.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

__all__ = ["Deadline", "format_duration", "parse_duration"]

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
    """A budget of ``seconds`` (``None``: unlimited), ``already_spent`` of it used before this process started."""

    seconds: float | None
    already_spent: float = 0.0
    _started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        """Seconds used so far, earlier runs included."""
        return self.already_spent + (time.monotonic() - self._started)

    def credit(self, seconds: float) -> None:
        """Gives back ``seconds`` just spent on work the budget does not cover (e.g. a benchmark's evaluation)."""
        self.already_spent -= seconds

    def remaining(self) -> float | None:
        return None if self.seconds is None else max(0.0, self.seconds - self.elapsed())

    def expired(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

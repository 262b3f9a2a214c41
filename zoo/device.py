"""Choosing the torch device.

Devices are passed, never assumed: every stage takes a device name and resolves it here.
``pick_device("auto")`` gives CUDA when a CUDA device is usable and the CPU otherwise, so the same
command runs on a laptop and on a GPU machine; asking for a device that is not there is an error, not a
silent fallback.
"""

from __future__ import annotations

import torch

from .errors import ZooError

__all__ = ["pick_device"]


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device called ``name``: ``"auto"``/``None`` (CUDA if available, else CPU), ``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` or ``"mps"``. A device that is not available raises :class:`ZooError`.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name.strip().lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = name.strip().lower()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise ZooError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ZooError(f"device '{name}' was asked for but CUDA is not available here; use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ZooError(f"device '{name}' does not exist; this machine has {count} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ZooError(f"device '{name}' was asked for but MPS is not available here; use cpu or auto")
    elif device.type != "cpu":
        raise ZooError(f"unsupported device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    return device

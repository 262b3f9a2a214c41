"""Choosing the torch device.

Devices are passed, never assumed: every stage takes a device name and resolves it here.
``pick_device("auto")`` gives CUDA when a CUDA device is usable and the CPU otherwise, so the same
command runs on a laptop and on a GPU machine; asking for a device that is not there is an error, not a
silent fallback.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ZooError

__all__ = ["Acceleration", "pick_device"]


@dataclass(frozen=True)
class Acceleration:
    """The one switch for fast kernels, so CUDA and CPU paths are right by construction.

    ``enabled`` gives, on CUDA, channels_last memory layout and bf16 autocast (no loss scaling needed: bf16
    has fp32's exponent range). On the CPU it changes nothing: measured on this project's 2-core CPU, a
    WRN-16-2's convolutions ran 1.2-1.3x faster in channels_last, but within a whole inversion step the
    element-wise kernels of the backward pass slowed down by as much (mixed-layout adds and copies), and
    bf16 has no fast path on a CPU without AVX-512 BF16. ``enabled=False`` runs plain fp32 NCHW everywhere,
    the reference the fast path is compared against.
    """

    device: torch.device
    enabled: bool = True

    @property
    def channels_last(self) -> bool:
        return self.enabled and self.device.type == "cuda"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.enabled and self.device.type == "cuda" else None

    def module(self, module: nn.Module) -> nn.Module:
        """``module`` on the device, in the layout its inputs will have."""
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def tensor(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-D image batch in the fast layout (other tensors unchanged)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)


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

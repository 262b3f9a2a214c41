"""Choosing the torch device.

Devices are passed, never assumed: every stage takes a device name and resolves it here.
``pick_device("auto")`` gives CUDA when a CUDA device is usable and the CPU otherwise, so the same
command runs on a laptop and on a GPU machine; asking for a device that is not there is an error, not a
silent fallback.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ZooError

__all__ = ["PRECISIONS", "PRECISION_HELP", "Acceleration", "auto_precision", "cpu_has_bf16", "pick_device",
           "peak_memory_bytes", "prepare_device", "slow_precision_note"]


#: The values of ``--precision``, on ``synth run``, ``distill run`` and ``distill train``.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: What ``--precision`` does, for both commands' ``--help``.
PRECISION_HELP = ("auto: bf16 autocast on CUDA with bf16 (fp16 + loss scaling on older CUDA) and on a CPU with "
                  "avx512_bf16/amx_bf16, fp32 on other CPUs; bf16 / fp16: forward passes under autocast (losses, "
                  "BN statistics, optimiser states fp32); fp32: plain fp32.")
#: Whether ``auto`` picks bf16 on a CPU with a bf16 fast path. On since bf16 students sat inside the fp32 seed
#: spread at equal images for gMI (3 seeds) and D2CIP (6 seeds), pipelines/results/fmnist32-cpu-precision.md.
CPU_AUTO_BF16 = True
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU has a bf16 fast path (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo's flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell, so no fast path assumed
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def auto_precision(device: torch.device) -> str:
    """What ``--precision auto`` means on ``device``: bf16 on CUDA that supports it, fp16 (with a grad scaler)
    on older CUDA; on a CPU bf16 only with a fast path and :data:`CPU_AUTO_BF16`; fp32 elsewhere."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and CPU_AUTO_BF16 and cpu_has_bf16():
        return "bf16"
    return "fp32"


def slow_precision_note(acceleration: Acceleration) -> str | None:
    """What to tell a user whose ``--precision`` has no known fast path on the device (None when it has one): bf16
    autocast on a CPU without ``avx512_bf16``/``amx_bf16``, and fp16 autocast on any CPU."""
    resolved, device = acceleration.resolved, acceleration.device
    if device.type != "cpu" or resolved == "fp32" or (resolved == "bf16" and cpu_has_bf16()):
        return None
    why = "no avx512_bf16 or amx_bf16" if resolved == "bf16" else "fp16 autocast on a CPU"
    return (f"--precision {resolved} on this CPU has no known fast path ({why}): expect it to run slower than "
            "--precision fp32")


@dataclass(frozen=True)
class Acceleration:
    """The one switch for fast kernels (``--precision``), so CUDA and CPU paths are right by construction.

    ``precision`` is ``auto``, ``fp32``, ``bf16`` or ``fp16``; :attr:`resolved` is what runs (``auto`` through
    :func:`auto_precision`). bf16 and fp16 run forward passes under autocast; parameters, optimiser states and
    the losses (callers cast logits and features to float before softmax, KL, InfoNCE, BN statistics) stay
    fp32. fp16 needs loss scaling (:meth:`grad_scaler`); bf16 has fp32's exponent range and does not.
    channels_last is used on CUDA with a reduced precision only: measured on this project's 2-core CPU, a
    WRN-16-2's convolutions ran 1.2-1.3x faster in channels_last, but within a whole inversion step the
    element-wise kernels of the backward pass slowed down by as much (mixed-layout adds and copies), and
    with bf16 autocast channels_last did not help either. ``fp32`` (or ``enabled=False``, the old
    ``--no-accelerate``) is plain fp32 NCHW everywhere, the reference the fast path is compared against.
    """

    device: torch.device
    enabled: bool = True
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ZooError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")

    @property
    def resolved(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``: the precision that runs on this device."""
        if not self.enabled:
            return "fp32"
        return auto_precision(self.device) if self.precision == "auto" else self.precision

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cuda" and self.resolved != "fp32"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.resolved]

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

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, active only for fp16 (whose gradients underflow without one)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.resolved == "fp16")


def prepare_device(device: torch.device) -> None:
    """Settings a job sets once on its device, in both stages: on CUDA, cuDNN picks the fastest kernels for the
    job's (fixed) input shapes once, and the peak-memory counter starts at zero so a job reports its own peak.
    Nothing to set on a CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """This job's peak memory: the CUDA allocator's peak on CUDA (counted from :func:`prepare_device`), else this
    process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


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

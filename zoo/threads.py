"""CPU threads on a shared machine: one per core that other work leaves free.

torch starts one thread per core. When another process holds one of them, the thread that shares its core runs
at half speed and every parallel region waits for it. On this project's 2-core CPU with a busy loop holding one
core, README command 1 made 0.30x the images it made on the quiet machine with torch's 2 threads (1,482-1,660 in
6 minutes against 4,510-5,422; `pipelines/results/demo.md`). So the ``synth`` and ``distill`` commands look at
the cores' use over a short window before they start and run as many threads as there are free cores (at least
one), saying so. ``OMP_NUM_THREADS`` (or ``torchrun``, which sets it) is the user's choice and is left alone, as
is every run on a GPU. Only the command-line entry points call :func:`fit_threads_to_free_cores`: in-process
callers (tests, notebooks) keep the threads they set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["asks_for_help", "fit_threads_for_command", "fit_threads_to_free_cores", "free_cores"]


def _core_times(stat: Path, cores: set[int]) -> tuple[float, float] | None:
    """(idle, total) jiffies summed over ``cores`` from /proc/stat; None where it cannot be read."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    idle = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        values = [float(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle += values[3] + values[4]
        total += sum(values)
    return (idle, total) if total else None


def free_cores(window: float = 0.5, stat: Path = Path("/proc/stat")) -> float | None:
    """How many of this process's cores sat idle over ``window`` seconds (None where the OS cannot say)."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    before = _core_times(stat, cores)
    time.sleep(window)
    after = _core_times(stat, cores)
    if before is None or after is None or after[1] <= before[1]:
        return None
    return len(cores) * (after[0] - before[0]) / (after[1] - before[1])


def asks_for_help(argv: Sequence[str]) -> bool:
    """Whether a command line only asks for help (no arguments, ``--help``, ``--version``): it computes nothing,
    so it need not spend the measuring window nor say how many threads it would run."""
    return not argv or any(arg in ("--help", "-h", "--version") for arg in argv)


def fit_threads_for_command(argv: Sequence[str], log: Callable[[str], None]) -> None:
    """What the ``synth`` and ``distill`` console entry points do before parsing ``argv``: fit the threads to the
    free cores, unless the command line only asks for help."""
    if not asks_for_help(argv):
        fit_threads_to_free_cores(log)


def fit_threads_to_free_cores(log: Callable[[str], None], free: float | None = None) -> int:
    """Sets torch's threads to the free cores (rounded, at least 1, at most torch's default) unless the user
    chose them (``OMP_NUM_THREADS``) or a GPU does the work; returns the threads in use."""
    threads = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS") or torch.cuda.is_available():
        return threads
    free = free_cores() if free is None else free
    if free is None:
        return threads
    fitted = max(1, min(threads, int(free + 0.5)))
    if fitted < threads:
        torch.set_num_threads(fitted)
        log(f"{threads - fitted} of {threads} cores busy with other work: running {fitted} thread"
            f"{'s' if fitted > 1 else ''} (OMP_NUM_THREADS=N to choose)")
    return torch.get_num_threads()

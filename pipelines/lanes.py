"""Running benchmark rows side by side ("lanes") on one machine.

With ``lanes = N`` in a pipeline's ``[budget]`` table, N rows run at a time and every synth/distill process they
start gets cores / N threads (``OMP_NUM_THREADS``, inherited by the child processes). On a shared, noisy
machine this is the fair way to compare methods: rows that run together see the same machine at every moment.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def run_in_lanes(items: Iterable[T], work: Callable[[T], None], lanes: int) -> None:
    """Calls ``work(item)`` for every item, ``lanes`` at a time; the first failure is raised."""
    if lanes < 1:
        raise ValueError(f"lanes must be at least 1, got {lanes}")
    if lanes > 1:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // lanes))
    with ThreadPoolExecutor(max_workers=lanes) as pool:
        for future in [pool.submit(work, item) for item in items]:
            future.result()

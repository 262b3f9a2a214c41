"""Running benchmark runs side by side ("lanes") without ever running more threads than the machine has cores.

``[budget] lanes = N`` and ``threads_per_lane = T`` (default: cores // N, at least 1): N runs at a time, each
child process with T threads (``OMP_NUM_THREADS``) and pinned to its own T cores (``os.sched_setaffinity``
where the OS has it; see :func:`pipelines.runs.run_command`). A plan with N x T > cores is refused: eight runs
on two cores measure contention, not methods (issue 22: gmi made 0.14-0.34 images/s at eight lanes on two cores
against 9+ alone). "Cores" are the ones this process may run on (``os.sched_getaffinity``), so a container
limited to two cores of a larger host counts two.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class OversubscribedError(ValueError):
    """A pipeline file asks for more threads at once than the machine has cores."""


@dataclass(frozen=True)
class Lane:
    """One lane: the cores its runs are pinned to (empty: not pinned) and the threads each run gets."""

    index: int
    cores: tuple[int, ...]
    threads: int

    def env(self) -> dict[str, str]:
        """Environment of a child process in this lane: torch (OpenMP) and MKL sized to the lane."""
        return {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}


@dataclass(frozen=True)
class LanePlan:
    lanes: int
    threads_per_lane: int
    cores: tuple[int, ...]

    def lane(self, index: int) -> Lane:
        """Lane ``index`` owns cores [index x T, (index + 1) x T) of the machine's cores."""
        start = index * self.threads_per_lane
        return Lane(index, self.cores[start:start + self.threads_per_lane], self.threads_per_lane)

    def whole(self) -> Lane:
        """Every core of the plan for one run alone (e.g. training a teacher before the lanes start)."""
        used = self.cores[:self.lanes * self.threads_per_lane]
        return Lane(0, used, len(used))

    def describe(self) -> str:
        return (f"{self.lanes} lane(s) x {self.threads_per_lane} thread(s) on {len(self.cores)} core(s) "
                f"({', '.join(f'lane {i}: cores {list(self.lane(i).cores)}' for i in range(self.lanes))})")


def available_cores() -> tuple[int, ...]:
    """The cores this process may run on, sorted."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def plan_lanes(budget: dict[str, Any], cores: Sequence[int] | int | None = None, source: str = "") -> LanePlan:
    """The lane plan of a pipeline's ``[budget]`` table on ``cores`` (default: this machine's); refuses
    lanes x threads_per_lane > cores."""
    if cores is None:
        cores = available_cores()
    cores = tuple(range(cores)) if isinstance(cores, int) else tuple(cores)
    lanes = int(budget.get("lanes", 1))
    if lanes < 1:
        raise ValueError(f"lanes must be at least 1, got {lanes}")
    threads = int(budget.get("threads_per_lane", max(1, len(cores) // lanes)))
    if threads < 1:
        raise ValueError(f"threads_per_lane must be at least 1, got {threads}")
    if lanes * threads > len(cores):
        where = f"{source}: " if source else ""
        raise OversubscribedError(
            f"{where}{lanes} lanes x {threads} thread(s) per lane = {lanes * threads} threads, but this machine "
            f"has {len(cores)} core(s): runs would share cores and measure contention, not methods. Set lanes x "
            f"threads_per_lane <= {len(cores)} in [budget] (e.g. lanes = {min(lanes, len(cores))}, "
            f"threads_per_lane = {max(1, len(cores) // min(lanes, len(cores)))}), or --lanes/--threads-per-lane.")
    return LanePlan(lanes, threads, cores)


def run_in_lanes(items: Iterable[T], work: Callable[[T, Lane], None], plan: LanePlan,
                 key: Callable[[T], Hashable] | None = None,
                 needs: Callable[[T], Iterable[Hashable]] | None = None) -> None:
    """Calls ``work(item, lane)`` for every item, ``plan.lanes`` at a time, each lane one thread.

    ``needs(item)`` names the keys (``key(item)``) of earlier items whose work must finish first; an item
    whose need failed fails too. A free lane takes the first item, in order, whose needs have finished, so a
    lane never sits waiting while a later item could run (a D2CIP seed's ablations wait for its hours-long
    stage 1; the other seeds' ablations run meanwhile). Every item runs (a multi-hour benchmark keeps its other
    rows when one fails); the first failure, in item order, is raised at the end.
    """
    key = key or (lambda item: item)  # type: ignore[assignment,return-value]
    needs = needs or (lambda item: ())
    pending = list(enumerate(items))
    keys = [key(item) for _, item in pending]
    position = {k: i for i, k in enumerate(keys)}
    wanted = {i: [n for n in needs(item) if n in position] for i, item in pending}  # others are on disk
    for i, _ in pending:
        late = [n for n in wanted[i] if position[n] >= i]
        if late:  # waiting on an item queued behind it could hold every lane forever
            raise ValueError(f"{keys[i]!r} needs {late!r}, which must come before it")
    finished: set[Hashable] = set()
    failed: set[Hashable] = set()
    failures: list[tuple[int, BaseException]] = []
    changed = threading.Condition()

    def next_ready() -> tuple[int, T] | None:
        """The first pending item whose needs have finished (taken off the queue); None when none is left."""
        with changed:
            while pending:
                for entry in pending:
                    if all(n in finished for n in wanted[entry[0]]):
                        pending.remove(entry)
                        return entry
                changed.wait()  # every pending item waits on a running one; wake when one finishes
            return None

    def lane_loop(lane: Lane) -> None:
        while (entry := next_ready()) is not None:
            index, item = entry
            try:
                broken = [n for n in wanted[index] if n in failed]
                if broken:
                    raise RuntimeError(f"{keys[index]!r} needs {broken[0]!r}, which failed")
                work(item, lane)
            except BaseException as error:  # noqa: B036 - recorded and re-raised after the other lanes finish
                with changed:
                    failures.append((index, error))
                    failed.add(keys[index])
            finally:
                with changed:
                    finished.add(keys[index])
                    changed.notify_all()

    threads = [threading.Thread(target=lane_loop, args=(plan.lane(i),), name=f"lane-{i}", daemon=True)
               for i in range(min(plan.lanes, len(pending)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise min(failures, key=lambda failure: failure[0])[1]


def add_lane_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lanes", type=int, default=None, help="runs at a time [default: the file's lanes]")
    parser.add_argument("--threads-per-lane", type=int, default=None,
                        help="threads (and cores) per run [default: the file's, or cores // lanes]")


def apply_lane_arguments(pipeline: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline with ``--lanes`` / ``--threads-per-lane`` over its ``[budget]`` (e.g. on a bigger machine)."""
    budget = dict(pipeline.get("budget", {}))
    if args.lanes is not None:
        budget["lanes"] = args.lanes
        if args.threads_per_lane is None:
            budget.pop("threads_per_lane", None)  # re-derived from the new lane count
    if args.threads_per_lane is not None:
        budget["threads_per_lane"] = args.threads_per_lane
    return {**pipeline, "budget": budget}

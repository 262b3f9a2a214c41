"""A time budget that re-plans: how many epochs still fit, asked again at every epoch boundary, and the cosine
learning rate re-laid over the answer.

:class:`EpochBudget` keeps the measured duration of every epoch and evaluation of this process (on the run's
clock, :mod:`timebudget`). After each epoch it plans again from the *recent* epochs (the last
:data:`RECENT_EPOCHS`), never from the first alone, keeping in reserve the final evaluation on the whole test set:

* **how many epochs run**: as many as fit at the recent epochs' *median* cost (one slow epoch, e.g. the first
  one's warm-up or a burst of load from another job, neither decides alone nor is ignored while it lasts). An
  epoch is only started when it is expected to fit, so the run ends within about one epoch of its budget.
* **how many epochs the learning rate anneals over**: as many as fit at the recent epochs' *fastest* cost, and
  at least :data:`RECENT_EPOCHS` more after a single measured epoch. An annealed rate cannot be raised again
  without a jump, so a plan that is still learning the machine's speed must not spend the schedule early (a
  first epoch 10x slower than the rest would otherwise anneal the rate to zero in the second and leave every
  later epoch at zero). When the next epoch is the last that fits, the rate anneals to zero in it and the run
  stops after it.

With ``charge_evaluations=False`` (``--budget-covers training``) evaluations are timed and reported but given back
to the deadline. Evaluation cost is measured once an evaluation has run; before that it is estimated at half the
training cost per image (a forward pass without backward, as measured on a CPU).

:class:`CosineSchedule` is the per-step cosine of the learning rate, base · ½(1 + cos(π p)), over a *progress*
p that runs from 0 to 1. Without a re-plan p = step / total steps (the classic schedule, unchanged: a budget
that fits every requested epoch trains exactly as a run without one). When the horizon changes at a boundary, p
keeps its value there and runs linearly to 1 at the new horizon, so the learning rate continues from where it is
and anneals to zero at the end.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from timebudget import Deadline

#: Epochs whose median duration predicts the next one.
RECENT_EPOCHS = 3


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Learning rate at 0-based ``step``: base · ½(1 + cos(π · step / total_steps))."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


@dataclass
class CosineSchedule:
    """lr(step) = base · ½(1 + cos(π · progress(step))); progress is linear from ``(anchor_step, anchor_progress)``
    to 1 at ``total_steps``."""

    base_lr: float
    total_steps: int
    anchor_step: int = 0
    anchor_progress: float = 0.0

    @property
    def relaid(self) -> bool:
        return not (self.anchor_step == 0 and self.anchor_progress == 0.0)

    def progress(self, step: int) -> float:
        if not self.relaid:
            return min(step, self.total_steps) / max(1, self.total_steps)
        span = max(1, self.total_steps - self.anchor_step)
        return self.anchor_progress + (1.0 - self.anchor_progress) * min(step - self.anchor_step, span) / span

    def lr(self, step: int) -> float:
        if not self.relaid:  # the classic formula in its own order of operations: the same rates, bit for bit
            return cosine_lr(self.base_lr, step, self.total_steps)
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))

    def relay(self, step: int, total_steps: int) -> None:
        """From ``step`` on, anneal from the current progress to 1 at ``total_steps`` (no jump in the rate)."""
        if total_steps == self.total_steps:
            return
        self.anchor_progress = self.progress(step)
        self.anchor_step = step
        self.total_steps = total_steps

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "cosine-per-step", "base_lr": self.base_lr, "total_steps": self.total_steps,
                "anchor_step": self.anchor_step, "anchor_progress": self.anchor_progress}

    @classmethod
    def resumed(cls, state: dict[str, Any] | None, base_lr: float, step: int, total_steps: int) -> CosineSchedule:
        """The schedule of a checkpoint continued at ``step`` towards ``total_steps``. A schedule that was never
        re-laid follows the requested length from the start (resuming with a larger ``--epochs`` follows the
        longer schedule, as it always has); a re-laid one continues from its progress at ``step``."""
        schedule = cls(base_lr, total_steps)
        if state and (state.get("anchor_step") or state.get("anchor_progress")):
            schedule = cls(base_lr, int(state["total_steps"]), int(state["anchor_step"]),
                           float(state["anchor_progress"]))
            schedule.relay(step, total_steps)
        return schedule


@dataclass
class EpochBudget:
    """Plans the epochs of a run under ``deadline`` (see the module docstring)."""

    deadline: Deadline
    requested: int  # the epochs asked for: never more
    charge_evaluations: bool = True
    final_eval_images: int = 0
    progress_eval_images: int = 0
    eval_every: int = 1
    epochs: list[tuple[float, int]] = field(default_factory=list)  # (seconds, images) of each epoch
    evaluations: list[tuple[float, int]] = field(default_factory=list)  # (seconds, images) of each evaluation
    plans: list[dict[str, Any]] = field(default_factory=list)  # one per boundary where the plan changed
    final: bool = False  # the plan's last epoch has been laid out (annealing to zero): no more epochs after it

    def observe_epoch(self, seconds: float, images: int) -> None:
        self.epochs.append((seconds, images))

    def observe_evaluation(self, seconds: float, images: int) -> None:
        """An evaluation just ran; under ``--budget-covers training`` its time is given back."""
        self.evaluations.append((seconds, images))
        if not self.charge_evaluations:
            self.deadline.credit(seconds)

    def epoch_seconds(self) -> float:
        """The next epoch's expected cost: the median of the recent epochs."""
        return statistics.median(s for s, _ in self.epochs[-RECENT_EPOCHS:])

    def eval_seconds_per_image(self) -> float:
        if self.evaluations:
            recent = self.evaluations[-RECENT_EPOCHS:]
            return sum(s for s, _ in recent) / max(1, sum(n for _, n in recent))
        recent_epochs = self.epochs[-RECENT_EPOCHS:]
        return sum(s for s, _ in recent_epochs) / max(1, sum(n for _, n in recent_epochs)) / 2

    def reserve(self) -> float:
        """Seconds kept for the final evaluation (nothing when evaluations are not charged)."""
        return self.eval_seconds_per_image() * self.final_eval_images if self.charge_evaluations else 0.0

    def plan(self, done: int, current: int) -> tuple[int, int]:
        """``(planned, horizon)`` after ``done`` finished epochs (``current``: the plan so far): the epochs to run in
        all, at the recent epochs' median cost, and the epochs the learning rate anneals over (see the module
        docstring), both between ``done`` and the requested epochs. Records the plan when it changes."""
        if self.final:
            return current, current
        evals = 0.0
        if self.charge_evaluations and self.progress_eval_images:
            evals = self.eval_seconds_per_image() * self.progress_eval_images / max(self.eval_every, 1)
        remaining = self.deadline.remaining() or 0.0
        available = max(0.0, remaining - self.reserve())
        recent = [s for s, _ in self.epochs[-RECENT_EPOCHS:]]

        def fit_in(per_epoch: float) -> int:
            return max(done, min(self.requested, done + int(available // max(per_epoch, 1e-9))))

        planned = fit_in(statistics.median(recent) + evals)
        horizon = max(planned, fit_in(min(recent) + evals))
        if len(self.epochs) == 1:  # one epoch (often a slow warm-up) cannot tell how many follow
            horizon = max(horizon, min(self.requested, done + RECENT_EPOCHS))
        elif planned == done + 1:  # the next epoch is the last: anneal to zero in it, and stop after it
            horizon, self.final = planned, True
        if planned != current:
            self.plans.append({"after_epoch": done, "epochs": planned, "anneal_over": horizon,
                               "seconds_per_epoch": round(statistics.median(recent) + evals, 4),
                               "elapsed_seconds": round(self.deadline.elapsed(), 3),
                               "reserve_seconds": round(self.reserve(), 3)})
        return planned, horizon

    def summary(self, planned: int) -> dict[str, Any]:
        """For metrics.json: the budget, the seconds used, and what the plan expected."""
        used = self.deadline.elapsed()
        return {"budget_seconds": self.deadline.seconds, "used_seconds": round(used, 3),
                "planned_seconds": round(self._expected_total(used), 3),
                "charge_evaluations": self.charge_evaluations, "epochs_planned": planned,
                "epoch_seconds_recent": round(self.epoch_seconds(), 4) if self.epochs else None,
                "plans": self.plans}

    def _expected_total(self, used: float) -> float:
        """What the last plan expected the run to use: its time then, its epochs to come, the final reserve."""
        if not self.plans:
            return used
        last = self.plans[-1]
        return last["elapsed_seconds"] + (last["epochs"] - last["after_epoch"]) * last["seconds_per_epoch"] \
            + last["reserve_seconds"]

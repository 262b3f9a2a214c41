"""What :func:`distill.train.fit` records around its loop: the resumable checkpoint, the time budget's plan,
the learning-rate schedule, the per-epoch history and the lines on the terminal.

Checkpoint (``<out>/last.pt``, rewritten atomically after every epoch, loaded with ``weights_only=True``):
model and optimizer state, the objective's own state (e.g. a projection it trains), the epoch count, RNG
states, the best accuracy, the per-epoch history (from which ``log.csv`` is rewritten, so a resumed run never
repeats a row), the schedule and the run's config. ``--resume`` continues a checkpoint only with the same run:
every config entry must match except those that cannot change what was learnt so far (:data:`RESUME_FREE_KEYS`:
the epoch count, the evaluation, where the data and teacher files lie); otherwise it refuses and names the
differing keys.

The output folder is held for the whole run (:func:`claimed_out_dir`): locked, so a second command writing the
same ``--out`` at the same time stops at once naming the first, instead of the two overwriting each other's
checkpoint, student and metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from atomicio import write_torch_atomic
from distill.budget import CosineSchedule, EpochBudget
from distill.core import DistillError, Objective
from distill.distributed import Distributed
from shards import ShardError
from shards.lock import FolderLock
from timebudget import Clock

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "distill-checkpoint/1"
RUN_LOCK_NAME = ".dfkd-run.lock"  # held by the command writing an output folder (shards' dataset lock, renamed)
#: Config entries a resumed run may change: they decide how long it runs, what it is evaluated on, or where
#: its inputs lie (the dataset's and the teacher's identity are their digests, which are compared).
RESUME_FREE_KEYS = frozenset({"loop.epochs", "loop.eval_every", "data", "teacher", "eval_data", "max_eval_samples",
                              "progress_eval_samples"})
#: What checkpoints written before every entry was compared recorded and were checked on (kept for them).
LEGACY_RESUME_KEYS = ("job", "student", "dataset_id", "objective", "batch_size", "temperature", "in_channels",
                      "num_classes", "loop.lr", "loop.momentum", "loop.weight_decay", "loop.seed", "augment",
                      "teacher")


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_accuracy: float | None
    final_accuracy: float | None
    train_images: int
    train_seconds: float
    start_epoch: int  # epochs already done when this process started (0 for a fresh run)
    planned_epochs: int  # the epochs run: config.epochs, or fewer when a time budget planned fewer
    eval_seconds: float = 0.0  # spent in evaluations (this process)
    budget: dict[str, Any] | None = None  # the time budget's record (EpochBudget.summary), when there was one

    @property
    def images_per_second(self) -> float | None:
        return self.train_images / self.train_seconds if self.train_seconds > 0 else None


def checkpoint_path(out_dir: Path) -> Path:
    return out_dir / CHECKPOINT_NAME


@contextmanager
def claimed_out_dir(out_dir: Path, resume: bool, writer: bool = True) -> Iterator[None]:
    """``out_dir`` held for a run: created, locked against a second command writing it at the same time, and
    refused when it holds a previous run (unless ``resume``). On the way out the lock goes, and a folder this
    call created that the run left empty (it stopped before writing anything) is removed again. ``writer``:
    false on torchrun's other ranks, which write nothing and only check."""
    if not writer:
        check_out_dir(out_dir, resume)
        yield
        return
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = FolderLock.acquire(out_dir, RUN_LOCK_NAME)
    except (OSError, ShardError) as error:
        raise DistillError(f"--out {out_dir}: {error}") from None
    try:
        check_out_dir(out_dir, resume)
        yield
    finally:
        lock.release()
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """Refuse to overwrite a previous run's checkpoint unless resuming (called before any expensive work)."""
    ckpt = checkpoint_path(out_dir)
    if ckpt.exists() and not resume:
        raise DistillError(
            f"{out_dir} holds a previous run ({ckpt}); pass --resume to continue it, or choose another --out"
        )


def save_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """``torch.save`` through :func:`atomicio.write_torch_atomic`: ``path`` never holds a partial checkpoint."""
    write_torch_atomic(path, ckpt)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure means the same to the user: this file cannot be resumed
        raise DistillError(f"cannot load checkpoint {path}: {exc}; remove it or choose another --out") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DistillError(f"{path} is not a distill checkpoint; remove it or choose another --out")
    return ckpt


def resume_differences(saved: dict[str, Any], current: dict[str, Any], complete: bool = True) -> list[str]:
    """The config keys that differ between a checkpoint's run and this one (``complete``: the checkpoint
    records every entry; older ones are checked on :data:`LEGACY_RESUME_KEYS`)."""
    keys = sorted((set(saved) | set(current)) - RESUME_FREE_KEYS) if complete else list(LEGACY_RESUME_KEYS)
    return [k for k in keys if saved.get(k) != current.get(k)]


def check_resume_config(path: Path, ckpt: dict[str, Any], current: dict[str, Any]) -> None:
    saved = ckpt.get("config", {})
    diffs = resume_differences(saved, current, complete=bool(ckpt.get("config_complete")))
    if diffs:
        lines = [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in diffs]
        raise DistillError(
            f"cannot resume {path}: it belongs to a different run (differing: {', '.join(diffs)}):\n  "
            + "\n  ".join(lines) + "\nUse another --out, or the same settings as the checkpoint."
        )


def say(enabled: bool, text: str) -> None:
    if enabled:
        tqdm.write(text)


class Bookkeeper:
    """The state a fit carries between epochs and writes after each: see the module docstring."""

    def __init__(self, config: Any, out_dir: Path, run_config: dict[str, Any], *, device: torch.device,
                 dist: Distributed, progress: bool, clock: Clock, budget: EpochBudget | None,
                 on_epoch: Callable[[list[dict[str, Any]]], None] | None, steps_per_epoch: int) -> None:
        self.config, self.out_dir, self.run_config = config, out_dir, run_config
        self.device, self.dist, self.progress, self.clock = device, dist, progress, clock
        self.budget, self.on_epoch, self.steps_per_epoch = budget, on_epoch, steps_per_epoch
        self.history: list[dict[str, Any]] = []
        self.best: float | None = None
        self.start_epoch = 0
        self.planned = config.epochs
        self.train_images, self.train_seconds, self.eval_seconds = 0, 0.0, 0.0
        self.schedule = CosineSchedule(config.lr, steps_per_epoch * self.planned)

    @property
    def ckpt_file(self) -> Path:
        return checkpoint_path(self.out_dir)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective,
                resume: bool) -> int:
        """Continues ``last.pt`` when there is one (only with ``resume``); returns the first epoch to run."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.ckpt_file.exists():
            if resume:
                say(self.progress, f"--resume: no checkpoint {self.ckpt_file} yet, starting a fresh run")
            return 0
        check_out_dir(self.out_dir, resume)
        ckpt = load_checkpoint(self.ckpt_file)
        check_resume_config(self.ckpt_file, ckpt, self.run_config)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("objective") is not None and hasattr(objective, "load_state_dict"):
            objective.load_state_dict(ckpt["objective"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.history = list(ckpt["history"])
        self.best = ckpt.get("best_accuracy")
        self.start_epoch = int(ckpt["epoch"])
        self.train_images = int(ckpt.get("train_images", 0))
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        self.schedule = CosineSchedule.resumed(ckpt.get("scheduler"), self.config.lr,
                                               self.start_epoch * self.steps_per_epoch,
                                               self.steps_per_epoch * self.planned)
        say(self.progress, f"resuming {self.ckpt_file} after epoch {self.start_epoch}")
        return self.start_epoch

    def after_training(self, epoch: int, loss_sum: torch.Tensor, seen: int, seconds: float) -> tuple[float, int]:
        """The epoch's figures over all ranks, checked; the budget re-planned. Returns the mean training loss and
        the images trained on (all ranks)."""
        if self.dist.active:  # the epoch's figures over all ranks
            seen = int(self.dist.sum_(torch.tensor([seen], dtype=torch.int64)).item())
            self.dist.sum_(loss_sum)
        if seen == 0:
            raise DistillError("an epoch yielded no batches: the dataset holds fewer than 2 samples")
        train_loss = float(loss_sum.item()) / seen
        if not math.isfinite(train_loss):
            raise DistillError(f"the training loss became {train_loss} in epoch {epoch + 1}; try a lower --lr")
        self.train_images += seen
        self.train_seconds += seconds
        if self.budget is not None:
            self.budget.observe_epoch(seconds, seen)
            planned, horizon = self.budget.plan(epoch + 1, self.planned)
            planned, horizon = self.dist.broadcast_int(planned), self.dist.broadcast_int(horizon)  # rank 0's for all
            self.schedule.relay((epoch + 1) * self.steps_per_epoch, horizon * self.steps_per_epoch)
            if planned != self.planned:
                say(self.progress, f"time budget: {planned} of {self.config.epochs} epochs fit (about "
                                   f"{self.budget.epoch_seconds():.1f} s each lately); the learning rate anneals "
                                   f"over {horizon}")
                self.planned = planned
        return train_loss, seen

    def evaluate(self, evaluate_fn: Callable[[nn.Module, bool], float] | None, model: nn.Module, epoch: int,
                 images: tuple[int, int]) -> float | None:
        """Evaluates when due (every ``eval_every`` epochs and after the last, which is ``final``), timed on the
        run's clock; ``images``: (progress, final) evaluation sizes, for the budget's estimate."""
        last = epoch + 1 == self.planned
        due = (epoch + 1) % max(self.config.eval_every, 1) == 0 or last
        if evaluate_fn is None or not due:
            return None
        started = self.clock()
        acc = evaluate_fn(model, last)
        spent = self.clock() - started
        self.eval_seconds += spent
        if self.budget is not None:
            self.budget.observe_evaluation(spent, images[1] if last else images[0])
        self.best = acc if self.best is None else max(self.best, acc)
        return acc

    def end_epoch(self, epoch: int, figures: tuple[float, int, float, float], acc: float | None, model: nn.Module,
                  optimizer: torch.optim.Optimizer, objective: Objective) -> None:
        """The epoch's row (``figures``: training loss, images, seconds, learning rate of its first step), the
        checkpoint (rank 0), the terminal line and ``on_epoch``."""
        train_loss, seen, seconds, lr = figures
        row = {"epoch": epoch + 1, "train_loss": train_loss, "eval_acc": acc, "lr": lr,
               "images_per_s": seen / max(seconds, 1e-9), "seconds": seconds}
        epoch_stats = getattr(objective, "epoch_stats", None)  # e.g. the condensed share of the batches
        if epoch_stats is not None:
            row.update(epoch_stats())
        self.history.append(row)
        if self.dist.is_main:  # one writer; the barrier below keeps the others from racing ahead
            save_checkpoint(self._checkpoint(epoch, model, optimizer, objective), self.ckpt_file)
        self.dist.barrier()
        acc_text = f"  acc {100 * acc:.2f}%" if acc is not None else ""
        say(self.progress, f"epoch {epoch + 1}/{self.planned}  loss {train_loss:.4f}{acc_text}  lr {lr:.4g}  "
                           f"{seen / max(seconds, 1e-9):.0f} img/s  {seconds:.1f} s")
        if self.on_epoch is not None and self.dist.is_main:
            self.on_epoch(self.history)

    def _checkpoint(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    objective: Objective) -> dict[str, Any]:
        state_dict = getattr(objective, "state_dict", None)
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch + 1,
            "planned_epochs": self.planned,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "objective": state_dict() if state_dict is not None else None,
            "scheduler": {**self.schedule.state_dict(), "epochs": self.planned,
                          "steps_per_epoch": self.steps_per_epoch},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
            "best_accuracy": self.best,
            "history": self.history,
            "train_images": self.train_images,
            "train_seconds": self.train_seconds,
            "config": self.run_config,
            "config_complete": True,
        }

    def result(self) -> FitResult:
        final = self.history[-1]["eval_acc"] if self.history else None
        return FitResult(self.history, self.best, final, self.train_images, self.train_seconds, self.start_epoch,
                         self.planned, self.eval_seconds,
                         self.budget.summary(self.planned) if self.budget is not None else None)

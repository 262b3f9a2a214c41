"""The training loop, written once for every job: KD from stored logits, KD from a live teacher, the papers'
student objectives, or supervised learning on labels. The loop takes a batch source (:mod:`distill.sources`)
and an *objective* (:mod:`distill.objectives`: a function of the student's logits and the batch); SGD with
momentum and weight decay, a per-step cosine learning rate, bf16 autocast and channels_last on CUDA and the
progress bar are here. What it records between epochs (checkpoint, resume, time budget, history, terminal
lines) is :mod:`distill.bookkeeping`; the budget's planner and the schedule are :mod:`distill.budget`.

The learning rate is the closed-form cosine of the global step (annealed per step, which matters for short CPU
budgets), so the "scheduler state" is the step plus, after a time budget re-planned, where it was re-laid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from distill.bookkeeping import Bookkeeper, FitResult
from distill.budget import CosineSchedule, EpochBudget
from distill.core import BatchSource, Objective, acceleration, autocast
from distill.distributed import SINGLE, Distributed, reduce_counts
from timebudget import Clock, Deadline, system_clock

#: Default KD temperature: 4, as RepDistiller / CRD use for CIFAR-sized students.
DEFAULT_TEMPERATURE = 4.0


@dataclass
class LoopConfig:
    """Optimisation settings shared by ``distill run`` and ``distill train`` (CLI options are built from
    these fields; ``metadata['help']`` is the option's help text)."""

    epochs: int = field(default=100, metadata={"help": "Training epochs (passes over the dataset)."})
    batch_size: int = field(default=256, metadata={"help": "Images per SGD step."})
    lr: float = field(default=0.1, metadata={"help": "Peak learning rate of SGD; cosine-annealed to 0."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay (L2)."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and augmentation."})
    eval_every: int = field(default=1, metadata={
        "help": "Evaluate every N epochs (always after the last); evaluation on 10k images costs seconds on a CPU."})


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def class_hits(model: nn.Module, source: BatchSource, num_classes: int, amp: bool = True) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """``(correct, total)`` per true class, int64 [num_classes], of ``model`` over one pass of ``source``."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.int64)
    total = torch.zeros(num_classes, dtype=torch.int64)
    try:
        for batch in source.epoch(0):
            with autocast(batch.images.device, amp):
                logits = model(batch.images)
            labels = batch.labels.cpu()
            hit = (logits.argmax(1).cpu() == labels).long()
            correct += torch.bincount(labels, weights=hit, minlength=num_classes).long()[:num_classes]
            total += torch.bincount(labels, minlength=num_classes)[:num_classes]
    finally:
        model.train(was_training)
    reduce_counts(source, correct, total)  # a source split over ranks: every rank gets the global counts
    return correct, total


def evaluate(model: nn.Module, source: BatchSource, amp: bool = True, num_classes: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` over one pass of ``source`` (in eval mode)."""
    correct, total = class_hits(model, source, num_classes, amp)
    return float(correct.sum()) / max(1, int(total.sum()))


def per_class_accuracy(model: nn.Module, source: BatchSource, num_classes: int,
                       amp: bool = True) -> tuple[float, list[float | None]]:
    """``(top-1 accuracy, accuracy on each true class)``; a class absent from ``source`` is None."""
    correct, total = class_hits(model, source, num_classes, amp)
    per_class = [float(c) / int(t) if t else None for c, t in zip(correct, total, strict=True)]
    return float(correct.sum()) / max(1, int(total.sum())), per_class


# ------------------------------------------------------------------------------------------ the loop


def fit(
    model: nn.Module,
    source: BatchSource,
    objective: Objective,
    config: LoopConfig,
    *,
    device: torch.device,
    out_dir: Path,
    run_config: dict[str, Any],
    evaluate_fn: Callable[[nn.Module, bool], float] | None = None,
    resume: bool = False,
    amp: bool = True,
    progress: bool = True,
    on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
    deadline: Deadline | None = None,
    charge_evaluations: bool = True,
    final_eval_images: int = 0,
    progress_eval_images: int = 0,
    dist: Distributed = SINGLE,
    clock: Clock | None = None,
) -> FitResult:
    """Train ``model`` for ``config.epochs`` epochs of ``source`` under ``objective``.

    ``model`` must already be on ``device``. After every epoch: evaluate (if ``evaluate_fn`` and due;
    ``evaluate_fn(model, final)`` is told whether this is the last evaluation, which must be on the full test
    set), save ``last.pt`` atomically, then call ``on_epoch(history)`` (used to rewrite log.csv). With
    ``resume`` and an existing ``last.pt`` the run continues after the checkpoint's epoch. An objective with
    ``parameters()`` trains them with the student (same optimiser settings) and keeps them in the checkpoint.

    With a ``deadline`` the run ends at an epoch boundary within about one epoch of the budget: at every
    boundary the epochs that still fit are planned again from the recent epochs' measured cost, with the final
    evaluation on ``final_eval_images`` images in reserve and the evaluations on ``progress_eval_images`` every
    ``eval_every`` epochs counted, and the rest of the cosine schedule is re-laid over them, so the learning
    rate still anneals to zero at the end (:mod:`distill.budget`). With ``charge_evaluations=False`` the budget
    covers training only: evaluations are timed and reported, their seconds given back to the deadline, and
    nothing is reserved for the final one (for a benchmark, where evaluation costs every method the same).
    Time is read on ``clock`` (default: the deadline's, else the machine's), so a test can drive it.

    With several ranks (``dist``, :mod:`distill.distributed`) the model trains inside DDP, the loss and image
    counts are summed over ranks, rank 0's epoch plan is everyone's, and only rank 0 writes and reports.
    """
    progress = progress and dist.is_main
    clock = clock or (deadline.clock if deadline is not None else system_clock)
    extra = list(getattr(objective, "parameters", list)())  # e.g. a projection the objective trains
    optimizer = make_optimizer(model, extra, config)
    scaler = acceleration(device).grad_scaler() if amp else None  # active for fp16 only (--precision)
    budget = None
    if deadline is not None:
        budget = EpochBudget(deadline, config.epochs, charge_evaluations, final_eval_images, progress_eval_images,
                             config.eval_every)
    steps_per_epoch = max(1, len(source))
    book = Bookkeeper(config, out_dir, run_config, device=device, dist=dist, progress=progress, clock=clock,
                      budget=budget, on_epoch=on_epoch, steps_per_epoch=steps_per_epoch)
    epoch = book.restore(model, optimizer, objective, resume)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    train_model = dist.wrap(model, device)  # after loading: DDP starts from rank 0's (identical) weights
    while epoch < book.planned:
        lr = book.schedule.lr(epoch * steps_per_epoch)  # logged: the epoch's first step
        loss_sum, seen, seconds = train_epoch(train_model, source, objective, optimizer, book.schedule, epoch,
                                              planned=book.planned, device=device, amp=amp, progress=progress,
                                              clock=clock, dist=dist, extra=extra, scaler=scaler)
        train_loss, seen = book.after_training(epoch, loss_sum, seen, seconds)
        acc = book.evaluate(evaluate_fn, model, epoch, (progress_eval_images, final_eval_images))
        book.end_epoch(epoch, (train_loss, seen, seconds, lr), acc, model, optimizer, objective)
        epoch += 1
    return book.result()


def make_optimizer(model: nn.Module, extra: list[nn.Parameter], config: LoopConfig) -> torch.optim.Optimizer:
    """SGD over the student's parameters, and in a second group (same settings) any the objective trains."""
    groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    if extra:
        groups.append({"params": extra})
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           nesterov=False)


def train_epoch(train_model: nn.Module, source: BatchSource, objective: Objective, optimizer: torch.optim.Optimizer,
                schedule: CosineSchedule, epoch: int, *, planned: int, device: torch.device, amp: bool,
                progress: bool, clock: Clock, dist: Distributed,
                extra: list[nn.Parameter],
                scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, int, float]:
    """One pass over ``source``: the summed loss (a device tensor), this rank's images and the epoch's seconds."""
    steps_per_epoch = max(1, len(source))
    train_model.train()
    loss_sum = torch.zeros((), device=device)
    seen = 0
    bar = tqdm(total=len(source), desc=f"epoch {epoch + 1}/{planned}", unit="batch", leave=False,
               disable=not progress, dynamic_ncols=True)
    started = clock()
    for step, batch in enumerate(source.epoch(epoch)):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(epoch * steps_per_epoch + step)
        with autocast(device, amp):
            logits = train_model(batch.images)
        loss = objective(logits.float(), batch)
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()  # fp16: scaled against underflow
        if extra and dist.active:  # DDP averages the student's gradients; the objective's are averaged here
            dist.average_gradients(extra)
        if scaler is not None:  # skips a step whose scaled gradients overflowed, then adapts the scale
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        loss_sum += loss.detach() * len(batch)
        seen += len(batch)
        bar.update(1)
        if progress and step % 20 == 0:  # .item() syncs the GPU: not every step
            elapsed = clock() - started
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen / max(elapsed, 1e-9):.0f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = clock() - started
    bar.close()
    return loss_sum, seen, seconds

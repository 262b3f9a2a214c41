"""The training loop, written once for every job: KD from stored logits, KD from a live teacher, or
supervised learning on labels. The loop takes a batch source (:mod:`distill.data`) and an *objective*
(a function of the student's logits and the batch); everything else — SGD with momentum and weight decay,
a cosine learning rate, bf16 autocast and channels_last on CUDA, progress bars, per-epoch evaluation,
the resumable checkpoint — is shared.

Checkpoint (``<out>/last.pt``, rewritten atomically after every epoch, loaded with ``weights_only=True``):
model and optimizer state, the epoch count, RNG states, the best accuracy, the per-epoch history (from
which ``log.csv`` is rewritten, so a resumed run never repeats a row) and the run's config (checked on
resume so a checkpoint is never continued with another student or dataset). The learning rate is the
closed-form cosine of the global step (annealed per step, which matters for short CPU budgets), so the
"scheduler state" is the epoch itself: resuming with a larger ``--epochs`` follows the longer schedule from
the next epoch on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from atomicio import write_atomic
from distill.data import Batch
from distill.distributed import SINGLE, Distributed, reduce_counts
from timebudget import Deadline

#: Default KD temperature: 4, as RepDistiller / CRD use for CIFAR-sized students.
DEFAULT_TEMPERATURE = 4.0
CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "distill-checkpoint/1"
#: Config keys that must match for --resume to continue a checkpoint.
RESUME_KEYS = ("job", "student", "dataset_id", "objective", "batch_size", "temperature", "in_channels",
               "num_classes")


class DistillError(Exception):
    """A problem with how distill was asked to run (output folder, resume, shapes); shown without traceback."""


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


class BatchSource(Protocol):
    num_samples: int

    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> Iterable[Batch]: ...


#: An objective maps (student logits as float32, the batch) to a scalar loss.
Objective = Callable[[torch.Tensor, Batch], torch.Tensor]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD: KL(softmax(t/T) ‖ softmax(s/T)) · T², averaged over the batch (T² keeps the gradient
    scale independent of T)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


class StoredLogitsKD:
    """KD against the teacher logits stored with each sample (float16 in the shards, float32 here)."""

    name = "kd-stored-logits"

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, student_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        if batch.logits is None:
            raise DistillError("this batch source carries no teacher logits")
        return kd_loss(student_logits, batch.logits, self.temperature)


class LiveTeacherKD:
    """KD against a teacher evaluated on exactly the (augmented) view the student sees."""

    name = "kd-live-teacher"

    def __init__(self, teacher: nn.Module, temperature: float, amp: bool) -> None:
        self.teacher = teacher.eval()
        self.temperature = temperature
        self.amp = amp
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def __call__(self, student_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        with torch.no_grad(), _autocast(batch.images.device, self.amp):
            teacher_logits = self.teacher(batch.images).float()
        return kd_loss(student_logits, teacher_logits, self.temperature)


class CrossEntropy:
    """Supervised training on the batch's labels."""

    name = "cross-entropy"

    def __call__(self, student_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(student_logits, batch.labels)


def _autocast(device: torch.device, enabled: bool) -> Any:
    # bf16 needs no loss scaling (same exponent range as fp32); only used on CUDA.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Learning rate at 0-based ``step``: base · ½(1 + cos(π · step / total_steps))."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


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
            with _autocast(batch.images.device, amp):
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


# ------------------------------------------------------------------------------------------ checkpoint


def checkpoint_path(out_dir: Path) -> Path:
    return out_dir / CHECKPOINT_NAME


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """Refuse to overwrite a previous run's checkpoint unless resuming (called before any expensive work)."""
    ckpt = checkpoint_path(out_dir)
    if ckpt.exists() and not resume:
        raise DistillError(
            f"{out_dir} holds a previous run ({ckpt}); pass --resume to continue it, or choose another --out"
        )


def save_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """``torch.save`` through :func:`atomicio.write_atomic`: ``path`` never holds a partial checkpoint."""
    write_atomic(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure means the same to the user: this file cannot be resumed
        raise DistillError(f"cannot load checkpoint {path}: {exc}; remove it or choose another --out") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DistillError(f"{path} is not a distill checkpoint; remove it or choose another --out")
    return ckpt


def _check_resume_config(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    diffs = [
        f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
        for k in RESUME_KEYS
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise DistillError(
            f"cannot resume {path}: it belongs to a different run:\n  " + "\n  ".join(diffs)
            + "\nUse another --out, or the same settings as the checkpoint."
        )


# ------------------------------------------------------------------------------------------ the loop


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

    @property
    def images_per_second(self) -> float | None:
        return self.train_images / self.train_seconds if self.train_seconds > 0 else None


def plan_epochs(requested: int, done: int, seconds_per_epoch: float, remaining: float, reserve: float) -> int:
    """How many epochs in all fit a time budget: the ``done`` ones plus as many more of ``seconds_per_epoch``
    as fit in ``remaining`` seconds less ``reserve`` (the final evaluation and saving), never fewer than
    ``done`` nor more than ``requested``."""
    more = int(max(0.0, remaining - reserve) // max(seconds_per_epoch, 1e-9))
    return max(done, min(requested, done + more))


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
) -> FitResult:
    """Train ``model`` for ``config.epochs`` epochs of ``source`` under ``objective``.

    ``model`` must already be on ``device``. After every epoch: evaluate (if ``evaluate_fn`` and due;
    ``evaluate_fn(model, final)`` is told whether this is the last evaluation, which must be on the full test
    set), save ``last.pt`` atomically, then call ``on_epoch(history)`` (used to rewrite log.csv). With
    ``resume`` and an existing ``last.pt`` the run continues after the checkpoint's epoch.

    With a ``deadline`` the run ends at an epoch boundary within the budget: after the first epoch of this
    process, the epochs that still fit are planned from its measured duration, keeping in reserve the time
    of the final evaluation on ``final_eval_images`` images and counting the evaluations on
    ``progress_eval_images`` every ``eval_every`` epochs (each estimated at half the training cost per
    image: a forward pass without backward, as measured on a CPU), and the cosine schedule is laid over the
    planned epochs, so the learning rate still anneals to zero at the end. A resumed run plans again from its
    own first epoch. With ``charge_evaluations=False`` the budget covers training only: evaluations are timed
    and reported, their seconds given back to the deadline, and nothing is reserved for the final one (for a
    benchmark, where evaluation costs every method the same).

    With several ranks (``dist``, :mod:`distill.distributed`) the model trains inside DDP, the loss and image
    counts are summed over ranks, rank 0's epoch plan is everyone's, and only rank 0 writes and reports.
    """
    progress = progress and dist.is_main
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_file = checkpoint_path(out_dir)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
        nesterov=False,
    )
    history: list[dict[str, Any]] = []
    best: float | None = None
    start_epoch = 0
    planned = config.epochs
    train_images, train_seconds = 0, 0.0
    if ckpt_file.exists():
        if not resume:
            check_out_dir(out_dir, resume)
        ckpt = load_checkpoint(ckpt_file)
        _check_resume_config(ckpt_file, ckpt.get("config", {}), run_config)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        history = list(ckpt["history"])
        best = ckpt.get("best_accuracy")
        start_epoch = int(ckpt["epoch"])
        train_images, train_seconds = int(ckpt.get("train_images", 0)), float(ckpt.get("train_seconds", 0.0))
        _say(progress, f"resuming {ckpt_file} after epoch {start_epoch}")
    elif resume:
        _say(progress, f"--resume: no checkpoint {ckpt_file} yet, starting a fresh run")
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    train_model = dist.wrap(model, device)  # after loading: DDP starts from rank 0's (identical) weights
    steps_per_epoch = max(1, len(source))
    eval_seconds = 0.0
    epoch = start_epoch
    while epoch < planned:
        total_steps = steps_per_epoch * planned
        lr = cosine_lr(config.lr, epoch * steps_per_epoch, total_steps)  # logged: the epoch's first step
        model.train()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(total=len(source), desc=f"epoch {epoch + 1}/{planned}", unit="batch",
                   leave=False, disable=not progress, dynamic_ncols=True)
        started = time.perf_counter()
        for step, batch in enumerate(source.epoch(epoch)):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(config.lr, epoch * steps_per_epoch + step, total_steps)
            with _autocast(device, amp):
                logits = train_model(batch.images)
            loss = objective(logits.float(), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(batch)
            seen += len(batch)
            bar.update(1)
            if progress and step % 20 == 0:  # .item() syncs the GPU: not every step
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen / max(elapsed, 1e-9):.0f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        bar.close()
        if dist.active:  # the epoch's figures over all ranks
            seen = int(dist.sum_(torch.tensor([seen], dtype=torch.int64)).item())
            dist.sum_(loss_sum)
        if seen == 0:
            raise DistillError("an epoch yielded no batches: the dataset holds fewer than 2 samples")
        train_loss = float(loss_sum.item()) / seen
        if not math.isfinite(train_loss):
            raise DistillError(f"the training loss became {train_loss} in epoch {epoch + 1}; try a lower --lr")
        if deadline is not None and epoch == start_epoch:
            # Plan the epochs that fit from this epoch's measured cost; the final evaluation is kept in reserve.
            per_image = seconds / seen / 2  # evaluation: forward only (measured at about half a training step)
            evaluations = per_image * progress_eval_images / max(config.eval_every, 1) if charge_evaluations else 0.0
            planned = dist.broadcast_int(plan_epochs(
                planned, epoch + 1, seconds + evaluations, deadline.remaining() or 0.0,
                reserve=per_image * final_eval_images if charge_evaluations else 0.0))
            if planned < config.epochs:
                _say(progress, f"time budget: {planned} of {config.epochs} epochs fit; the learning-rate schedule "
                               "is planned for them")
        last = epoch + 1 == planned
        due = (epoch + 1) % max(config.eval_every, 1) == 0 or last
        acc = None
        if evaluate_fn is not None and due:
            eval_started = time.perf_counter()
            acc = evaluate_fn(model, last)
            spent = time.perf_counter() - eval_started
            eval_seconds += spent
            if deadline is not None and not charge_evaluations:
                deadline.credit(spent)
        if acc is not None:
            best = acc if best is None else max(best, acc)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "eval_acc": acc, "lr": lr,
               "images_per_s": seen / seconds, "seconds": seconds}
        epoch_stats = getattr(objective, "epoch_stats", None)  # e.g. the condensed share of the batches
        if epoch_stats is not None:
            row.update(epoch_stats())
        history.append(row)
        train_images += seen
        train_seconds += seconds
        if dist.is_main:  # one writer; the barrier below keeps the others from racing ahead
            save_checkpoint({
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch + 1,
                "planned_epochs": planned,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": {"kind": "cosine-per-step", "base_lr": config.lr, "epochs": planned,
                              "steps_per_epoch": steps_per_epoch},
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
                "best_accuracy": best,
                "history": history,
                "train_images": train_images,
                "train_seconds": train_seconds,
                "config": run_config,
            }, ckpt_file)
        dist.barrier()
        acc_text = f"  acc {100 * acc:.2f}%" if acc is not None else ""
        _say(progress, f"epoch {epoch + 1}/{planned}  loss {train_loss:.4f}{acc_text}  lr {lr:.4g}  "
                       f"{seen / seconds:.0f} img/s  {seconds:.1f} s")
        if on_epoch is not None and dist.is_main:
            on_epoch(history)
        epoch += 1
    final = history[-1]["eval_acc"] if history else None
    return FitResult(history, best, final, train_images, train_seconds, start_epoch, planned, eval_seconds)


def _say(enabled: bool, text: str) -> None:
    if enabled:
        tqdm.write(text)

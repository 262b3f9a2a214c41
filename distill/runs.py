"""``distill run`` as a plain function, :func:`distill_from_shards`, read top to bottom as its steps:

1. :func:`prepare_run` — the options: this rank, the device, the output folder (held for the run by
   :func:`~distill.bookkeeping.claimed_out_dir`: locked, and refused if it holds another run), the time budget;
2. :func:`~distill.dataset_view.read_dataset` — the manifest, checked, and the shapes the student trains and
   is evaluated at;
3. :func:`build_student`, :func:`load_live_teacher`, :func:`build_evaluation` — the networks and the
   evaluation data, each checked against the dataset *before* any expensive work;
4. :func:`build_batches` — the batch source, chosen and built in :mod:`distill.sources`;
5. :func:`make_objective` — what the student minimises, chosen in :mod:`distill.objective_choice`;
6. :func:`distill.train.fit` — the loop;
7. :func:`write_run_outputs` — student, metrics, log and plot.

``cli.py`` only parses options; ``distill train`` is :mod:`distill.train_real`, what both share :mod:`distill.jobs`.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import realdata
import zoo
from distill import distributed, report
from distill.bookkeeping import FitResult, claimed_out_dir
from distill.core import DistillError, Objective, acceleration
from distill.dataset_view import DatasetView, manifest_digest, read_dataset, resolve_eval_data
from distill.distributed import Distributed
from distill.jobs import (
    EVAL_BATCH,
    JobResult,
    check_fits,
    configure_device,
    load_eval,
    load_teacher,
    resolve_augment,
    student_card_kwargs,
    summary_line,
    write_outputs,
)
from distill.objective_choice import ObjectiveChoice, ObjectiveOptions, build_objective, choose_objective
from distill.sources import ShardBatchSource, real_source, shard_source
from distill.train import DEFAULT_TEMPERATURE, LoopConfig, evaluate, fit, per_class_accuracy
from timebudget import Clock, Deadline, system_clock
from zoo.architectures.fewer_patches_vit import FewerPatchesViT, is_torchvision_vit


@dataclass
class RunOptions:
    """Everything ``distill run`` needs; defaults are the CLI's."""

    shards: str
    student: str
    loop: LoopConfig = field(default_factory=LoopConfig)
    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    temperature: float = DEFAULT_TEMPERATURE
    teacher: str | None = None
    teacher_arch: str | None = None
    trust_torchscript: bool = False  # a TorchScript --teacher runs code when loaded: only when the user says so
    eval_data: str | None = None
    eval_size: int | None = None
    max_eval_samples: int | None = None
    progress_eval_samples: int | None = None  # evaluations before the last use a seeded subset of this many
    time_budget: float | None = None  # seconds of wall time for the whole run (see distill.train.fit)
    budget_covers: str = "all"  # "training": evaluations are not charged to the time budget
    out: Path | None = None
    resume: bool = False
    device: str = "auto"
    workers: int | None = None
    cache: str = "auto"  # auto | memory | stream
    cache_dir: str | None = None  # remote shards are kept here (shards.remote.ShardCache)
    offline: bool = False  # a remote set's manifest from cache_dir, without asking the server
    augment: str = "auto"  # auto | on | off
    resize: int | None = None  # shard images resized to N×N (else a set of several sizes trains by resolution)
    synthetic_weight: float = 1.0  # mixed sets: weight of the KD expectation over synthetic samples
    condensed_weight: float = 1.0  # mixed sets: weight of the KD expectation over condensed samples
    msarc_weight: float = 0.0  # DiffDFKD Eq. 12: weight of the CAM alignment with the live teacher (0: off)
    msarc_stages: str | None = None  # "s1,s2:t1,t2" module paths; None: chosen for zoo architectures
    progress: bool = True
    command: str = ""
    clock: Clock | None = None  # what the time budget reads (tests drive it; None: the machine's clock)


@dataclass
class Run:
    """Step 1's answer: where and how this process runs."""

    dist: Distributed
    device: torch.device
    out: Path
    clock: Clock
    deadline: Deadline | None
    wall_start: float


@dataclass
class Evaluation:
    """Step 3's evaluation: the test data, the function fit calls, and the per-class figures it fills."""

    dataset: realdata.RealDataset | None
    full_source: Any = None  # the whole test split
    evaluate_fn: Callable[[nn.Module, bool], float] | None = None
    progress_images: int = 0
    per_class: list[float | None] = field(default_factory=list)  # the final evaluation's, per true class


def distill_from_shards(opts: RunOptions) -> JobResult:
    """``distill run``: train a student from a shard dataset's images and stored (or live) teacher logits."""
    run = prepare_run(opts)
    with claimed_out_dir(run.out, opts.resume, writer=run.dist.is_main):  # one command per --out at a time
        data = read_dataset(opts.shards, resize=opts.resize, cache_dir=opts.cache_dir, offline=opts.offline)
        opts.eval_data = resolve_eval_data(opts.eval_data, data.teacher_info.get("dataset"), opts.progress)
        student, arch = build_student(opts, data)
        teacher, teacher_acc = load_live_teacher(opts, data)
        evaluation = build_evaluation(opts, data, run)
        source, data_path = build_batches(opts, data, teacher, run)
        student.to(run.device)
        objective, choice = make_objective(opts, data, student, teacher, run)
        if teacher is not None and teacher_acc is None and evaluation.dataset is not None:
            teacher_acc = evaluate(teacher, evaluation.full_source)
        run_config = describe_run(opts, data, arch, objective, choice, teacher)
        eval_images = len(evaluation.dataset) if evaluation.dataset is not None else 0
        result = fit(student, source, objective, opts.loop, device=run.device, out_dir=run.out, run_config=run_config,
                     evaluate_fn=evaluation.evaluate_fn, resume=opts.resume, progress=opts.progress,
                     on_epoch=lambda history: report.write_log_csv(run.out / "log.csv", history),
                     deadline=run.deadline, charge_evaluations=opts.budget_covers == "all",
                     final_eval_images=eval_images, progress_eval_images=evaluation.progress_images, dist=run.dist,
                     clock=run.clock)
        if not run.dist.is_main:  # rank 0 writes the outputs
            distributed.shutdown()
            return JobResult(run.out, {}, None)
        return write_run_outputs(opts, run, data, student, arch, teacher_acc, choice, objective, run_config, result,
                                 evaluation, data_path)


# ------------------------------------------------------------------------------------------ the steps


def prepare_run(opts: RunOptions) -> Run:
    """This rank, the device, the output folder and the budget's clock."""
    clock = opts.clock or system_clock
    wall_start = time.perf_counter()
    deadline = Deadline(opts.time_budget, clock=clock) if opts.time_budget is not None else None
    dist = distributed.init()  # torchrun: this rank's place; otherwise a single process
    opts.progress = opts.progress and dist.is_main
    device = zoo.pick_device(dist.device_name(opts.device))
    if opts.loop.batch_size % dist.world:
        raise DistillError(f"--batch-size {opts.loop.batch_size} is the global batch; it must split evenly over "
                           f"{dist.world} processes")
    return Run(dist, device, opts.out or default_run_out(opts.shards, opts.student), clock, deadline, wall_start)


def build_student(opts: RunOptions, data: DatasetView) -> tuple[zoo.Classifier, str]:
    """A fresh architecture with the teacher's normalisation (seeded), or a warm start from a checkpoint."""
    c, h, _ = data.shape
    if _is_checkpoint(opts.student):
        student = zoo.load_classifier(opts.student, map_location="cpu")
        arch, what = student.card.arch, f"student {opts.student}"
    else:
        arch = zoo.canonical_arch(opts.student)
        mean, std = data.teacher_info.get("mean"), data.teacher_info.get("std")
        if mean is None or std is None:
            warnings.warn(f"{data.where} records no teacher normalisation; the student uses mean 0.5, std 0.5",
                          stacklevel=1)
            mean, std = (0.5,) * c, (0.5,) * c
        torch.manual_seed(opts.loop.seed)
        card = zoo.TeacherCard(arch=arch, num_classes=data.num_classes, in_channels=c, input_size=h,
                               mean=tuple(mean), std=tuple(std), class_names=list(data.class_names))
        student = zoo.Classifier(zoo.build_model(arch, data.num_classes, c), card=card)
        what = f"student {arch}"
    if is_torchvision_vit(student.network) and any(shape[1:] != (h, h) for shape in data.stored_shapes):
        # K-Gen's appendix A.1: a ViT student learns from the reduced-size images with fewer patches and
        # centre-biased position-embedding windows, and is evaluated (and saved) as the plain ViT at full size.
        student.network = FewerPatchesViT(student.network, random_offsets=True)
        print(f"{what}: a ViT trained on fewer patches at the stored sizes (K-Gen appendix A.1)", file=sys.stderr)
    for fits in dict.fromkeys([data.shape, *data.stored_shapes]):
        check_fits(student, fits, data.num_classes, what, data.where)
    return student, arch


def load_live_teacher(opts: RunOptions, data: DatasetView) -> tuple[zoo.Classifier | None, float | None]:
    """``--teacher``, checked against the dataset (a different teacher than the one that labelled it is
    warned about), and the teacher accuracy to report."""
    teacher_acc = data.teacher_info.get("test_accuracy")
    if not opts.teacher:
        if opts.msarc_weight > 0:
            raise DistillError("--msarc-weight aligns the student's class activation maps with the teacher's: it "
                               "needs the teacher (--teacher CHECKPOINT)")
        return None, teacher_acc
    teacher = load_teacher(opts.teacher, opts.teacher_arch, opts.trust_torchscript)
    check_fits(teacher, data.shape, data.num_classes, f"teacher {opts.teacher}", data.where)
    recorded = data.teacher_info.get("sha256")
    if recorded and teacher.card.sha256 and recorded != teacher.card.sha256:
        warnings.warn(f"teacher {opts.teacher} (sha256 {teacher.card.sha256[:12]}…) is not the one that "
                      f"labelled {data.where} ({recorded[:12]}…)", stacklevel=1)
    if teacher.card.test_accuracy is not None:
        teacher_acc = teacher.card.test_accuracy
    return teacher, teacher_acc


def build_evaluation(opts: RunOptions, data: DatasetView, run: Run) -> Evaluation:
    """The test split (checked against the dataset's shape), a seeded subset for evaluations before the last,
    and the full set, per class, for the last."""
    eval_ds = load_eval(opts.eval_data, opts.eval_size, opts.max_eval_samples, opts.loop.seed, data.shape,
                        data.num_classes, data.where)
    evaluation = Evaluation(eval_ds)
    if eval_ds is None:
        return evaluation
    full = evaluation.full_source = _eval_source(eval_ds, opts, run)
    progress_source, evaluation.progress_images = full, len(eval_ds)
    if opts.progress_eval_samples and opts.progress_eval_samples < len(eval_ds):
        subset = eval_ds.subset(opts.progress_eval_samples, seed=opts.loop.seed)
        progress_source, evaluation.progress_images = _eval_source(subset, opts, run), len(subset)

    def evaluate_fn(model: nn.Module, final: bool) -> float:
        if not final:
            return evaluate(model, progress_source, num_classes=data.num_classes)
        accuracy, evaluation.per_class[:] = per_class_accuracy(model, full, data.num_classes)
        return accuracy

    evaluation.evaluate_fn = evaluate_fn
    return evaluation


def _eval_source(ds: realdata.RealDataset, opts: RunOptions, run: Run) -> Any:
    return real_source(ds, batch_size=EVAL_BATCH, device=run.device, augment=False, shuffle=False, seed=0,
                       workers=opts.workers, dist=run.dist)


def build_batches(opts: RunOptions, data: DatasetView, teacher: zoo.Classifier | None,
                  run: Run) -> tuple[ShardBatchSource, str]:
    """The shards as training batches (:mod:`distill.sources`): stored logits unless a live teacher labels them."""
    augment = resolve_augment(opts.augment, teacher is not None, supervised=False)
    configure_device(run.device)
    return shard_source(opts.shards, data.manifest, cache=opts.cache, workers=opts.workers,
                        batch_size=opts.loop.batch_size // run.dist.world, seed=opts.loop.seed, device=run.device,
                        dist=run.dist, augment=augment, with_logits=teacher is None, progress=opts.progress,
                        with_sources=bool(data.condensed_counts), cache_dir=opts.cache_dir, plan=data.plan,
                        offline=opts.offline)


def make_objective(opts: RunOptions, data: DatasetView, student: nn.Module, teacher: zoo.Classifier | None,
                   run: Run) -> tuple[Objective, ObjectiveChoice]:
    """The student's objective (:mod:`distill.objective_choice`), said on the terminal."""
    choice = choose_objective(opts.objective, data.manifest, mixed=bool(data.condensed_counts),
                              msarc=opts.msarc_weight > 0, live=teacher is not None)
    if teacher is not None:
        teacher.to(run.device)
    objective = build_objective(choice, location=opts.shards, manifest=data.manifest, student=student,
                                teacher=teacher, temperature=opts.temperature,
                                condensed_weights=(opts.synthetic_weight, opts.condensed_weight),
                                msarc=(opts.msarc_weight, opts.msarc_stages))
    if teacher is not None and run.device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
    if run.dist.is_main:
        print(choice.line(), file=sys.stderr)
    return objective, choice


def describe_run(opts: RunOptions, data: DatasetView, arch: str, objective: Objective, choice: ObjectiveChoice,
                 teacher: zoo.Classifier | None) -> dict[str, Any]:
    """The run's config: recorded in the checkpoint and metrics.json; a resume must match it
    (:mod:`distill.bookkeeping`)."""
    c, _, _ = data.shape
    run_config = {
        # dataset_id: the manifest's digest, so a moved dataset directory still resumes.
        "job": "distill run", "student": arch, "dataset_id": manifest_digest(opts.shards, data.manifest)[0],
        "data": opts.shards, "objective": getattr(objective, "name", choice.kind),
        "objective_weights": objective_weights(choice, objective), "batch_size": opts.loop.batch_size,
        "temperature": opts.temperature, "in_channels": c, "num_classes": data.num_classes,
        "augment": resolve_augment(opts.augment, teacher is not None, supervised=False), "teacher": opts.teacher,
        "teacher_sha256": teacher.card.sha256 if teacher is not None else None, "eval_data": opts.eval_data,
        **{f"loop.{k_}": v for k_, v in asdict(opts.loop).items()},
    }
    if data.condensed_counts:
        run_config.update(synthetic_weight=opts.synthetic_weight, condensed_weight=opts.condensed_weight)
    if opts.resize is not None:
        run_config["resize"] = opts.resize
    if opts.msarc_weight > 0:
        run_config.update(msarc_weight=opts.msarc_weight, msarc_stages=[list(p) for p in objective.pairs])
    return run_config


def objective_weights(choice: ObjectiveChoice, objective: Objective) -> dict[str, Any]:
    return {**choice.weights, **getattr(objective, "weights", {})}


def write_run_outputs(opts: RunOptions, run: Run, data: DatasetView, student: zoo.Classifier, arch: str,
                      teacher_acc: float | None, choice: ObjectiveChoice, objective: Objective,
                      run_config: dict[str, Any], result: FitResult, evaluation: Evaluation,
                      data_path: str) -> JobResult:
    """student.pt (+ card), metrics.json, log.csv, accuracy.png; the summary line."""
    c, h, w = data.shape
    manifest = data.manifest
    manifest_sha, sha_of = manifest_digest(opts.shards, manifest)
    student.to("cpu")
    if isinstance(student.network, FewerPatchesViT):  # saved as the plain torchvision ViT it wraps
        student.network = student.network.vit
    zoo.save_classifier(student, run.out / "student.pt", test_accuracy=result.final_accuracy, command=opts.command,
                        dataset=f"shards:{opts.shards}", **student_card_kwargs(student.card))
    method = manifest.get("method")
    method_name = method.get("name") if isinstance(method, dict) else None
    metrics = {
        "job": "distill run", "student": arch, "final_accuracy": result.final_accuracy,
        "best_accuracy": result.best_accuracy, "teacher_accuracy": teacher_acc,
        "objective": {"name": run_config["objective"], "kind": choice.kind, "chosen_by": choice.chosen_by,
                      "reason": choice.reason, "weights": run_config["objective_weights"]},
        "epochs": result.planned_epochs, "epochs_requested": opts.loop.epochs,
        "epochs_this_process": result.planned_epochs - result.start_epoch,
        "time_budget_seconds": opts.time_budget,
        "time_budget_covers": opts.budget_covers if opts.time_budget is not None else None,
        "time_budget": result.budget,  # planned vs used seconds, and each re-plan
        "images_per_second": result.images_per_second, "world_size": run.dist.world,
        "train_images": result.train_images, "train_seconds": result.train_seconds,
        "eval_seconds": result.eval_seconds, "wall_seconds": time.perf_counter() - run.wall_start,
        "per_class_accuracy": evaluation.per_class or None,
        "peak_memory": report.peak_memory(run.device), "device": report.device_description(run.device),
        "precision": acceleration(run.device).resolved, "data_path": data_path,
        "dataset": {"location": opts.shards, "manifest_sha256": manifest_sha, "manifest_sha256_of": sha_of,
                    "num_samples": int(manifest["num_samples"]), "image_shape": [h, w, c],
                    "num_classes": data.num_classes, "method": method_name},
        "config": run_config, "command": opts.command,
        "resolutions": {**data.plan.to_dict(), "eval_size": [h, w]},
    }
    if data.condensed_counts:
        shares = [row["condensed_share"] for row in result.history if "condensed_share" in row]
        metrics["sources"] = {**data.condensed_counts,
                              "condensed_share_of_batches": sum(shares) / len(shares) if shares else None,
                              "synthetic_weight": opts.synthetic_weight, "condensed_weight": opts.condensed_weight}
    write_outputs(run.out, metrics, result, f"{arch} distilled from {opts.shards}", teacher_acc)
    distributed.shutdown()
    return JobResult(run.out, metrics, summary_line(result.final_accuracy, teacher_acc))


# ------------------------------------------------------------------------------------------ helpers


def default_run_out(shards_location: str, student: str) -> Path:
    """``artifacts/students/<dataset folder name>/<student>`` under the current directory: the dataset
    may be remote or read-only, so students never go inside it."""
    name = shards_location.rstrip("/").split("/")[-1] or "dataset"
    student_name = Path(student).stem if _is_checkpoint(student) else student.replace(":", "-")
    return Path("artifacts") / "students" / name / student_name


def _is_checkpoint(student: str) -> bool:
    return os.path.sep in student or student.endswith((".pt", ".pth", ".pth.tar", ".ckpt")) or Path(
        student
    ).is_file()

"""``distill run`` as a plain function, :func:`distill_from_shards`: it resolves the inputs (manifest, student,
teacher, eval data), checks that they fit together *before* any expensive work, builds a batch source and an
objective, hands both to :func:`distill.train.fit`, and writes the outputs. ``cli.py`` only parses options;
``distill train`` is :mod:`distill.train_real`, what both share :mod:`distill.jobs`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shards
import zoo
from distill import distributed, report
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
from distill.mixed import SyntheticCondensedKD
from distill.resolutions import plan_resolutions
from distill.sources import real_source, shard_source
from distill.train import (
    DEFAULT_TEMPERATURE,
    DistillError,
    LiveTeacherKD,
    LoopConfig,
    StoredLogitsKD,
    check_out_dir,
    evaluate,
    fit,
    per_class_accuracy,
)
from timebudget import Deadline


@dataclass
class RunOptions:
    """Everything ``distill run`` needs; defaults are the CLI's."""

    shards: str
    student: str
    loop: LoopConfig = field(default_factory=LoopConfig)
    temperature: float = DEFAULT_TEMPERATURE
    teacher: str | None = None
    teacher_arch: str | None = None
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
    augment: str = "auto"  # auto | on | off
    resize: int | None = None  # shard images resized to N×N (else a set of several sizes trains by resolution)
    synthetic_weight: float = 1.0  # mixed sets: weight of the KD expectation over synthetic samples
    condensed_weight: float = 1.0  # mixed sets: weight of the KD expectation over condensed samples
    msarc_weight: float = 0.0  # DiffDFKD Eq. 12: weight of the CAM alignment with the live teacher (0: off)
    msarc_stages: str | None = None  # "s1,s2:t1,t2" module paths; None: chosen for zoo architectures
    progress: bool = True
    command: str = ""


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


def _manifest_digest(location: str, manifest: dict[str, Any]) -> tuple[str, str]:
    local = Path(location) / "manifest.json"
    if "://" not in location and local.is_file():
        return hashlib.sha256(local.read_bytes()).hexdigest(), "file"
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest(), "canonical-json"


# ------------------------------------------------------------------------------------------ distill run


def resolve_eval_data(eval_data: str | None, teacher_dataset: str | None, verbose: bool) -> str | None:
    """``auto``: the real dataset named on the teacher's card, when its files are on this machine."""
    if eval_data is None or eval_data.lower() == "none":
        return None
    if eval_data != "auto":
        return eval_data
    if not teacher_dataset:
        return None
    try:
        import realdata

        realdata.load(teacher_dataset, split="test", progress=False)
    except Exception:  # not on this machine: distil without evaluation rather than fail
        if verbose:
            print(f"note: the teacher was trained on {teacher_dataset!r}, which is not found here; "
                  "no evaluation (pass --eval-data SPEC)", file=sys.stderr)
        return None
    if verbose:
        print(f"evaluating on {teacher_dataset} (the teacher's dataset, from its card)", file=sys.stderr)
    return teacher_dataset


def distill_from_shards(opts: RunOptions) -> JobResult:
    """``distill run``: train a student from a shard dataset's images and stored (or live) teacher logits."""
    wall_start = time.perf_counter()
    deadline = Deadline(opts.time_budget) if opts.time_budget is not None else None
    dist = distributed.init()  # torchrun: this rank's place; otherwise a single process
    opts.progress = opts.progress and dist.is_main
    device = zoo.pick_device(dist.device_name(opts.device))
    if opts.loop.batch_size % dist.world:
        raise DistillError(f"--batch-size {opts.loop.batch_size} is the global batch; it must split evenly over "
                           f"{dist.world} processes")
    out = opts.out or default_run_out(opts.shards, opts.student)
    check_out_dir(out, opts.resume)

    manifest = shards.read_manifest(opts.shards, cache_dir=opts.cache_dir)
    if int(manifest["num_samples"]) < 2:
        raise DistillError(f"dataset {opts.shards} holds {manifest['num_samples']} samples; nothing to learn from")
    if not manifest.get("complete", True):
        warnings.warn(f"dataset {opts.shards} is incomplete ({manifest['num_samples']} of "
                      f"{manifest.get('target_samples')} samples); distilling from what is there", stacklevel=1)
    h, w, c = (int(v) for v in manifest["schema"]["image"]["shape"])
    k = int(manifest["num_classes"])
    where = f"dataset {opts.shards}"
    teacher_info: dict[str, Any] = manifest.get("teacher") or {}
    # Stored sizes other than the teacher's (K-Gen): batches by resolution, or --resize; the student's nominal
    # size (its card, the evaluation) is the teacher's input size, or the resize.
    plan = plan_resolutions(manifest, opts.resize)
    stored_shapes = [(c, sh, sw) for sh, sw in plan.sizes]
    if plan.mode == "resized" and plan.train_size:
        h, w = plan.train_size
        stored_shapes = [(c, h, w)]
    elif isinstance(teacher_info.get("input_size"), int) and (plan.mode != "single" or plan.sizes != ((h, w),)
                                                               or teacher_info["input_size"] != h):
        h = w = int(teacher_info["input_size"])
    shape = (c, h, w)
    if plan.mode != "single" or stored_shapes != [shape]:
        print(f"{where}: {plan.describe()}; evaluating at {h}x{w}", file=sys.stderr)
    opts.eval_data = resolve_eval_data(opts.eval_data, teacher_info.get("dataset"), opts.progress)
    class_names = teacher_info.get("class_names") or [str(i) for i in range(k)]
    if len(class_names) != k:
        class_names = [str(i) for i in range(k)]

    # The student: a fresh architecture with the teacher's normalisation, or a warm start from a checkpoint.
    if _is_checkpoint(opts.student):
        student = zoo.load_classifier(opts.student, map_location="cpu")
        arch = student.card.arch
        what = f"student {opts.student}"
    else:
        arch = zoo.canonical_arch(opts.student)
        mean, std = teacher_info.get("mean"), teacher_info.get("std")
        if mean is None or std is None:
            warnings.warn(f"{where} records no teacher normalisation; the student uses mean 0.5, std 0.5",
                          stacklevel=1)
            mean, std = (0.5,) * c, (0.5,) * c
        torch.manual_seed(opts.loop.seed)
        card = zoo.TeacherCard(arch=arch, num_classes=k, in_channels=c, input_size=h, mean=tuple(mean),
                               std=tuple(std), class_names=list(class_names))
        student = zoo.Classifier(zoo.build_model(arch, k, c), card=card)
        what = f"student {arch}"
    for fits in dict.fromkeys([shape, *stored_shapes]):
        check_fits(student, fits, k, what, where)

    teacher = None
    teacher_acc = teacher_info.get("test_accuracy")
    if opts.teacher:
        teacher = load_teacher(opts.teacher, opts.teacher_arch)
        check_fits(teacher, shape, k, f"teacher {opts.teacher}", where)
        recorded = teacher_info.get("sha256")
        if recorded and teacher.card.sha256 and recorded != teacher.card.sha256:
            warnings.warn(f"teacher {opts.teacher} (sha256 {teacher.card.sha256[:12]}…) is not the one that "
                          f"labelled {where} ({recorded[:12]}…)", stacklevel=1)
        teacher_acc = teacher.card.test_accuracy if teacher.card.test_accuracy is not None else teacher_acc
    if opts.msarc_weight > 0 and teacher is None:
        raise DistillError("--msarc-weight aligns the student's class activation maps with the teacher's: it needs "
                           "the teacher (--teacher CHECKPOINT)")
    eval_ds = load_eval(opts.eval_data, opts.eval_size, opts.max_eval_samples, opts.loop.seed, shape, k, where)

    augment = resolve_augment(opts.augment, teacher is not None, supervised=False)
    configure_device(device)
    # A set with condensed samples (synth --condensed) learns from the paper's two KD expectations.
    sources = manifest.get("source_counts") or {}
    mixed = int(sources.get("condensed", 0)) > 0
    source, data_path = shard_source(opts.shards, manifest, cache=opts.cache, workers=opts.workers,
                                     batch_size=opts.loop.batch_size // dist.world, seed=opts.loop.seed,
                                     device=device, dist=dist,
                                     augment=augment, with_logits=teacher is None, progress=opts.progress,
                                     with_sources=mixed, cache_dir=opts.cache_dir, plan=plan)
    student.to(device)
    objective: Any
    if opts.msarc_weight > 0 and mixed:
        raise DistillError("--msarc-weight is not supported on sets with condensed samples yet")
    if opts.msarc_weight > 0:
        from distill.msarc import MSARCKD

        objective = MSARCKD(student, teacher.to(device), opts.temperature, opts.msarc_weight, opts.msarc_stages)
    elif mixed:
        objective = SyntheticCondensedKD(opts.temperature, opts.synthetic_weight, opts.condensed_weight,
                                         teacher.to(device) if teacher is not None else None)
    elif teacher is not None:
        objective = LiveTeacherKD(teacher.to(device), opts.temperature, amp=True)
    else:
        objective = StoredLogitsKD(opts.temperature)
    if teacher is not None and device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
    evaluate_fn = None
    progress_eval_images = 0
    final_per_class: list[float | None] = []  # the final evaluation's accuracy on each true class
    if eval_ds is not None:
        eval_source = real_source(eval_ds, batch_size=EVAL_BATCH, device=device, augment=False, shuffle=False,
                                  seed=0, workers=opts.workers, dist=dist)
        progress_source = eval_source
        progress_eval_images = len(eval_ds)
        if opts.progress_eval_samples and opts.progress_eval_samples < len(eval_ds):
            subset = eval_ds.subset(opts.progress_eval_samples, seed=opts.loop.seed)
            progress_source = real_source(subset, batch_size=EVAL_BATCH, device=device, augment=False,
                                          shuffle=False, seed=0, workers=opts.workers, dist=dist)
            progress_eval_images = len(subset)

        def evaluate_fn(model: nn.Module, final: bool) -> float:
            if not final:
                return evaluate(model, progress_source, num_classes=k)
            accuracy, final_per_class[:] = per_class_accuracy(model, eval_source, k)
            return accuracy

        if teacher is not None and teacher_acc is None:
            teacher_acc = evaluate(teacher, eval_source)

    manifest_sha, sha_of = _manifest_digest(opts.shards, manifest)
    run_config = {
        # dataset_id: the manifest's digest, so a moved dataset directory still resumes.
        "job": "distill run", "student": arch, "dataset_id": manifest_sha, "data": opts.shards,
        "objective": objective.name, "batch_size": opts.loop.batch_size, "temperature": opts.temperature,
        "in_channels": c, "num_classes": k, "augment": augment, "teacher": opts.teacher,
        "eval_data": opts.eval_data, **{f"loop.{k_}": v for k_, v in asdict(opts.loop).items()},
    }
    if mixed:
        run_config.update(synthetic_weight=opts.synthetic_weight, condensed_weight=opts.condensed_weight)
    if opts.resize is not None:
        run_config["resize"] = opts.resize
    if opts.msarc_weight > 0:
        run_config.update(msarc_weight=opts.msarc_weight, msarc_stages=[list(p) for p in objective.pairs])

    result = fit(student, source, objective, opts.loop, device=device, out_dir=out, run_config=run_config,
                 evaluate_fn=evaluate_fn, resume=opts.resume, progress=opts.progress,
                 on_epoch=lambda history: report.write_log_csv(out / "log.csv", history), deadline=deadline,
                 charge_evaluations=opts.budget_covers == "all",
                 final_eval_images=len(eval_ds) if eval_ds is not None else 0,
                 progress_eval_images=progress_eval_images, dist=dist)
    if not dist.is_main:  # rank 0 writes the outputs
        distributed.shutdown()
        return JobResult(out, {}, None)

    final_acc = result.final_accuracy
    student.to("cpu")
    zoo.save_classifier(student, out / "student.pt", test_accuracy=final_acc, command=opts.command,
                        dataset=f"shards:{opts.shards}", **student_card_kwargs(student.card))
    metrics = {
        "job": "distill run",
        "student": arch,
        "final_accuracy": final_acc,
        "best_accuracy": result.best_accuracy,
        "teacher_accuracy": teacher_acc,
        "epochs": result.planned_epochs,
        "epochs_requested": opts.loop.epochs,
        "epochs_this_process": result.planned_epochs - result.start_epoch,
        "time_budget_seconds": opts.time_budget,
        "time_budget_covers": opts.budget_covers if opts.time_budget is not None else None,
        "images_per_second": result.images_per_second,
        "world_size": dist.world,
        "train_images": result.train_images,
        "train_seconds": result.train_seconds,
        "eval_seconds": result.eval_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "per_class_accuracy": final_per_class or None,
        "peak_memory": report.peak_memory(device),
        "device": report.device_description(device),
        "data_path": data_path,
        "dataset": {"location": opts.shards, "manifest_sha256": manifest_sha, "manifest_sha256_of": sha_of,
                    "num_samples": int(manifest["num_samples"]), "image_shape": [h, w, c], "num_classes": k,
                    "method": (manifest.get("method") or {}).get("name") if isinstance(manifest.get("method"),
                                                                                          dict) else None},
        "config": run_config,
        "command": opts.command,
        "resolutions": {**plan.to_dict(), "eval_size": [h, w]},
    }
    if mixed:
        shares = [row["condensed_share"] for row in result.history if "condensed_share" in row]
        metrics["sources"] = {**sources, "condensed_share_of_batches": sum(shares) / len(shares) if shares else None,
                              "synthetic_weight": opts.synthetic_weight, "condensed_weight": opts.condensed_weight}
    write_outputs(out, metrics, result, f"{arch} distilled from {opts.shards}", teacher_acc)
    distributed.shutdown()
    return JobResult(out, metrics, summary_line(final_acc, teacher_acc))


# ------------------------------------------------------------------------------------------ distill train

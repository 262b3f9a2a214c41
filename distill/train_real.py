"""``distill train``: supervised training (or KD from ``--teacher``) on a real labelled dataset — the
references every benchmark sets beside its synthetic rows."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import realdata
import zoo
from distill import report
from distill.bookkeeping import claimed_out_dir
from distill.core import acceleration
from distill.jobs import (
    EVAL_BATCH,
    JobResult,
    check_fits,
    configure_device,
    load_eval,
    load_teacher,
    percent,
    resolve_augment,
    student_card_kwargs,
    summary_line,
    write_outputs,
)
from distill.objectives import CrossEntropy, LiveTeacherKD
from distill.sources import real_source
from distill.train import DEFAULT_TEMPERATURE, LoopConfig, evaluate, fit


@dataclass
class TrainOptions:
    """Everything ``distill train`` needs; defaults are the CLI's."""

    data: str
    arch: str
    out: Path
    loop: LoopConfig = field(default_factory=LoopConfig)
    temperature: float = DEFAULT_TEMPERATURE
    teacher: str | None = None
    teacher_arch: str | None = None
    trust_torchscript: bool = False  # a TorchScript --teacher runs code when loaded: only when the user says so
    size: int | None = None
    eval_data: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    resume: bool = False
    device: str = "auto"
    workers: int | None = None
    augment: str = "auto"
    progress: bool = True
    command: str = ""



def train_on_real(opts: TrainOptions) -> JobResult:
    """``distill train``: supervised training (or KD from ``--teacher``) on a real labelled dataset."""
    wall_start = time.perf_counter()
    device = zoo.pick_device(opts.device)
    with claimed_out_dir(opts.out, opts.resume):  # one command per --out at a time
        train_ds = realdata.load(opts.data, split="train", size=opts.size).subset(opts.max_train_samples,
                                                                                  seed=opts.loop.seed)
        shape, k = train_ds.input_shape, train_ds.num_classes
        c, h, w = shape
        where = f"--data {opts.data}"
        eval_spec = opts.eval_data or opts.data
        eval_ds = load_eval(eval_spec, opts.size, opts.max_eval_samples, opts.loop.seed, shape, k, where)
        mean, std = realdata.normalization(train_ds)

        arch = zoo.canonical_arch(opts.arch)
        torch.manual_seed(opts.loop.seed)
        card = zoo.TeacherCard(arch=arch, num_classes=k, in_channels=c, input_size=h, mean=mean, std=std,
                               class_names=train_ds.class_names, dataset=opts.data)
        model = zoo.Classifier(zoo.build_model(arch, k, c), card=card)
        check_fits(model, shape, k, f"model {arch}", where)
        teacher = None
        if opts.teacher:
            teacher = load_teacher(opts.teacher, opts.teacher_arch, opts.trust_torchscript)
            check_fits(teacher, shape, k, f"teacher {opts.teacher}", where)

        augment = resolve_augment(opts.augment, teacher is not None, supervised=teacher is None)
        configure_device(device)
        source = real_source(train_ds, batch_size=opts.loop.batch_size, device=device, augment=augment,
                             shuffle=True, seed=opts.loop.seed, workers=opts.workers)
        eval_source = real_source(eval_ds, batch_size=EVAL_BATCH, device=device, augment=False, shuffle=False,
                                  seed=0, workers=opts.workers) if eval_ds is not None else None
        model.to(device)
        objective: Any = CrossEntropy()
        teacher_acc = None
        if teacher is not None:
            teacher.to(device)
            if device.type == "cuda":
                teacher.to(memory_format=torch.channels_last)
            objective = LiveTeacherKD(teacher, opts.temperature, amp=True)
            teacher_acc = teacher.card.test_accuracy
            if teacher_acc is None and eval_source is not None:
                teacher_acc = evaluate(teacher, eval_source)

        run_config = {
            "job": "distill train", "student": arch, "data": opts.data, "objective": objective.name,
            "dataset_id": f"{opts.data} size={opts.size} max_train_samples={opts.max_train_samples}",
            "batch_size": opts.loop.batch_size, "temperature": opts.temperature if teacher is not None else None,
            "in_channels": c, "num_classes": k, "augment": augment, "teacher": opts.teacher, "size": opts.size,
            "max_train_samples": opts.max_train_samples, "eval_data": eval_spec,
            "max_eval_samples": opts.max_eval_samples, **{f"loop.{k_}": v for k_, v in asdict(opts.loop).items()},
        }

        def evaluate_fn(m: nn.Module, final: bool) -> float:
            assert eval_source is not None
            return evaluate(m, eval_source)

        result = fit(model, source, objective, opts.loop, device=device, out_dir=opts.out, run_config=run_config,
                     evaluate_fn=evaluate_fn if eval_source is not None else None, resume=opts.resume,
                     progress=opts.progress, on_epoch=lambda history: report.write_log_csv(opts.out / "log.csv",
                                                                                           history))
        final_acc = result.final_accuracy
        model.to("cpu")
        zoo.save_classifier(model, opts.out / "model.pt", test_accuracy=final_acc, command=opts.command,
                            dataset=opts.data, **student_card_kwargs(model.card))
        metrics = {
            "job": "distill train",
            "arch": arch,
            "objective": objective.name,
            "final_accuracy": final_acc,
            "best_accuracy": result.best_accuracy,
            "teacher_accuracy": teacher_acc,
            "epochs": opts.loop.epochs,
            "epochs_this_process": opts.loop.epochs - result.start_epoch,
            "images_per_second": result.images_per_second,
            "train_images": result.train_images,
            "train_seconds": result.train_seconds,
            "wall_seconds": time.perf_counter() - wall_start,
            "peak_memory": report.peak_memory(device),
            "device": report.device_description(device),
            "precision": acceleration(device).resolved,
            "data_path": "memory" if train_ds.in_memory else "loader",
            "dataset": {"spec": opts.data, "train_samples": len(train_ds), "eval_spec": eval_spec,
                        "eval_samples": len(eval_ds) if eval_ds is not None else 0, "image_shape": [h, w, c],
                        "num_classes": k, "mean": list(mean), "std": list(std)},
            "config": run_config,
            "command": opts.command,
        }
        title = f"{arch} on {opts.data}" + (" (KD)" if teacher is not None else "")
        write_outputs(opts.out, metrics, result, title, teacher_acc)
        line = summary_line(final_acc, teacher_acc) if teacher is not None else (
            None if final_acc is None else f"test accuracy: {percent(final_acc)}")
        return JobResult(opts.out, metrics, line)

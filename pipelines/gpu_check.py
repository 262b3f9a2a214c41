"""The GPU check, prepared for the day a device is lent: every method under every precision, in one command.

    python -m pipelines.gpu_check [--out gpu_check.json] [--precisions fp32,bf16,fp16] [--max-steps 50] [--budget 480]
    python -m pipelines.gpu_check --smoke        # on the CPU, in seconds: what CI runs so this does not rot

On CUDA: every method (``synth run METHOD --preset paper``, the shipped WRN-16-2 teacher) for two batches in
fp32, bf16 and fp16 (one method's precisions back to back, each timed run after a short warm-up copy of it),
DiffDFKD on a tiny DDPM pipeline built here, ``distill run`` for one epoch on the gMI set (and again under
``torchrun`` with NCCL when the machine has 2+ GPUs). The paper's batch sizes and networks run, but each
batch's step counts (inversion steps, iterations, KD steps, stage-1 iterations) are capped at ``--max-steps``
so that the whole check fits ``--budget`` seconds (8 minutes by default); runs that would start after the
budget is spent are recorded as skipped. K-Gen uses ``--class-embedding centre`` (no text encoder needed
offline). Each run is recorded with its images/s, seconds, peak GPU memory and any error (a failing run does
not stop the check) in one JSON file, with each reduced precision's images/s over fp32's per method.

First run (NVIDIA H200, torch 2.11, 2026-12-04, before the warm-up, one precision after another):
``pipelines/results/gpu-check-h200.md``. Every method ran without error in fp32 and bf16; bf16 was not faster
than fp32 for any method there, but those short runs may have counted each kernel's first use: hence the warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atomicio import write_atomic, write_json_atomic

METHODS = ("gmi", "deepinversion", "fast", "cmi", "d2cip", "cpsc", "kgen", "kgen-s")
#: Per-batch step counts the check caps (whichever a method's config has).
CAPPED = ("inversion_steps", "iterations", "kd_steps", "prior_iterations", "warmup")
#: --smoke: tiny networks and budgets, so that every code path runs in seconds on a CPU.
SMOKE_ARGS = ["--batch-size", "4", "--inversion-steps", "1", "--kd-steps", "1", "--proxy-student", "resnet8",
              "--latent-dim", "16", "--generator-width", "8", "--memory-capacity", "64"]
SMOKE_EXTRA = {"deepinversion": ["--batch-size", "4", "--iterations", "1"],
               "d2cip": ["--prior-iterations", "2", "--bank-size", "16"],
               "cmi": ["--bank-size", "32", "--negatives", "16"], "fast": ["--warmup", "1"],
               "kgen": ["--resolutions", "32", "--batch-sizes", "4"], "kgen-s": ["--resolutions", "32",
                                                                                   "--batch-sizes", "4"]}
#: --smoke runs these (every method runs under bf16 in tests/test_precision.py already): a generator method, the
#: one with a CAM; DiffDFKD and distill always run.
SMOKE_METHODS = ("gmi", "kgen")
#: Step cap of the warm-up run before each timed run: same networks, batch and image sizes, few steps.
WARMUP_STEPS = 2


def _gpu_peak(device: str, recorded: int | None) -> int | None:
    """The peak GPU memory a command recorded of itself (both stages count it from their start), None on a CPU."""
    return recorded if device == "cuda" else None


def _invoke(main: Any, args: list[str]) -> str | None:
    """Runs a click command in this process; the error, as text, or None."""
    try:
        main.main(args, standalone_mode=False)
    except SystemExit as exit_:  # click's exit with a status
        return None if not exit_.code else f"exit status {exit_.code}"
    except Exception as error:  # noqa: BLE001 - every failure is a finding to record, not a reason to stop
        return f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=-3)}"
    return None


def _method_args(name: str, smoke: bool, max_steps: int) -> list[str]:
    from synth.core.registry import get_method

    if smoke:
        base = SMOKE_EXTRA["deepinversion"] if name == "deepinversion" else [*SMOKE_ARGS, *SMOKE_EXTRA.get(name, [])]
        return [*base, *(["--class-embedding", "centre"] if name.startswith("kgen") else [])]
    fields = {f.name: f.default for f in dataclasses.fields(get_method(name).config_class)}
    args = []
    for field in CAPPED:
        value = fields.get(field)
        if isinstance(value, int) and value > max_steps:
            args += [f"--{field.replace('_', '-')}", str(max_steps)]
    if name.startswith("kgen"):
        args += ["--class-embedding", "centre"]
    return args


def _batch_size(name: str, args: list[str]) -> int:
    from synth.core.registry import get_method

    if "--batch-size" in args:
        return int(args[args.index("--batch-size") + 1])
    config = get_method(name).config_class
    return int({f.name: f.default for f in dataclasses.fields(config)}["batch_size"])


def synth_run(name: str, precision: str, out: Path, teacher: str, device: str, extra: list[str],
              batches: int = 2) -> dict[str, Any]:
    """``synth run`` of ``batches`` batches at ``precision``: images/s (the manifest's), seconds, peak memory."""
    from synth.commands.cli import main

    size = _batch_size(name, extra)
    args = ["run", name, "--out", str(out), "--teacher", teacher, "--preset", "paper", "--device", device,
            "--precision", precision, "--num-images", str(batches * size), "--shard-size", str(size), "--quiet",
            *extra]
    started = time.perf_counter()
    error = _invoke(main, args)
    record: dict[str, Any] = {"kind": "synth", "method": name, "precision": precision, "images": batches * size,
                              "seconds": round(time.perf_counter() - started, 2), "peak_gpu_memory_bytes": None,
                              "error": error, "command": "synth " + " ".join(args)}
    if error is None:
        summary = json.loads((out / "manifest.json").read_text())["summary"]
        record["images_per_second"] = summary.get("synthesis_images_per_second")
        record["peak_gpu_memory_bytes"] = _gpu_peak(device, summary.get("peak_memory_bytes"))
    return record


def tiny_ddpm(path: Path) -> Path:
    """A randomly initialised pixel-space DDPM (16x16) saved as a diffusers pipeline: DiffDFKD's code path."""
    import torch
    from diffusers import DDPMPipeline

    from pipelines.train_ddpm import build

    torch.manual_seed(0)
    unet, scheduler = build(16, 3, 8)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


def distill_run(shards: Path, precision: str, out: Path, device: str, smoke: bool) -> dict[str, Any]:
    from distill.cli import main

    args = ["run", "--shards", str(shards), "--student", "resnet8" if smoke else "wrn16_1", "--epochs", "1",
            "--batch-size", "4" if smoke else "256", "--eval-data", "none", "--out", str(out), "--workers", "0",
            "--quiet", "--device", device, "--precision", precision]
    started = time.perf_counter()
    error = _invoke(main, args)
    record: dict[str, Any] = {"kind": "distill", "method": "distill run", "precision": precision,
                              "seconds": round(time.perf_counter() - started, 2), "peak_gpu_memory_bytes": None,
                              "error": error, "command": "distill " + " ".join(args)}
    if error is None:
        metrics = json.loads((out / "metrics.json").read_text())
        record["images_per_second"] = metrics.get("images_per_second")
        record["peak_gpu_memory_bytes"] = _gpu_peak(device, metrics.get("peak_memory", {}).get("bytes"))
    return record


def torchrun_distill(shards: Path, out: Path, gpus: int, timeout: float) -> dict[str, Any]:
    """``distill run`` for one epoch under torchrun, one process per GPU (NCCL)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "distill", "run", "--shards", str(shards), "--student", "wrn16_1", "--epochs", "1",
               "--batch-size", "256", "--eval-data", "none", "--out", str(out), "--workers", "0", "--quiet",
               "--precision", "auto"]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout, 10))
        error = None if done.returncode == 0 else f"exit status {done.returncode}: {done.stderr[-2000:]}"
    except subprocess.TimeoutExpired:
        error = "timed out"
    record: dict[str, Any] = {"kind": "torchrun", "method": f"distill run x{gpus} (NCCL)", "precision": "auto",
                              "seconds": round(time.perf_counter() - started, 2), "error": error,
                              "command": " ".join(command)}
    if error is None:
        record["images_per_second"] = json.loads((out / "metrics.json").read_text()).get("images_per_second")
    return record


def speedups(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each reduced precision's images/s over fp32's, per method where both ran."""
    speed = {(r["method"], r["precision"]): r.get("images_per_second") for r in runs}
    ratios: dict[str, dict[str, float]] = {}
    for (method, precision), rate in speed.items():
        base = speed.get((method, "fp32"))
        if precision != "fp32" and rate and base:
            ratios.setdefault(method, {})[precision] = round(rate / base, 3)
    return ratios


def check(out_json: Path, smoke: bool, precisions: list[str], methods: list[str], max_steps: int,
          budget: float, teacher: str | None = None) -> dict[str, Any]:
    import torch

    import zoo

    device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "gpus": torch.cuda.device_count(), "torch": torch.__version__, "smoke": smoke,
                              "max_steps": None if smoke else max_steps, "budget_seconds": budget, "runs": runs}

    def spent() -> bool:
        return time.perf_counter() - started > budget

    def record(entry: dict[str, Any]) -> None:
        runs.append(entry)
        shown = entry.get("images_per_second")
        outcome = "ERROR " + entry["error"][:200] if entry["error"] else "ok"
        print(f"{entry['method']:16s} {entry['precision']:5s} {entry['seconds']:7.1f} s  "
              f"{shown if shown is not None else '-'} images/s  {outcome}", flush=True)
        report["total_seconds"] = round(time.perf_counter() - started, 2)
        write_json_atomic(out_json, report, indent=1)  # after every run: a killed check keeps what it found

    def timed(run: Callable[..., dict[str, Any]], label: str, warm: dict[str, Any], **options: Any) -> None:
        """``run(out=..., **options)`` twice: first a short warm-up copy (``options`` updated by ``warm``), then
        the timed run, recorded. On a GPU the first use of a kernel (lazy loading, cuDNN's choice of algorithm per
        shape and dtype) takes seconds, which the first check (H200, 2026-12-04) counted into short runs'
        images/s. Of the warm-up only which run it warmed up and its seconds are kept."""
        warm_up = run(out=tmp / f"warm-{label}", **{**options, **warm})
        report.setdefault("warm_ups", []).append({key: warm_up[key] for key in ("kind", "method", "precision",
                                                                                "seconds")})
        record(run(out=tmp / label, **options))

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp_dir:
        tmp = Path(tmp_dir)
        if teacher is None and smoke:
            teacher_path = tmp / "teacher.pt"
            torch.manual_seed(0)
            network = zoo.build_model("resnet8", 10, 3)
            zoo.save_classifier(zoo.Classifier(network, (0.5,) * 3, (0.25,) * 3), teacher_path, arch="resnet8",
                                num_classes=10, in_channels=3, input_size=32,
                                class_names=[f"class{i}" for i in range(10)])
            teacher = str(teacher_path)
        teacher = teacher or str(zoo.default_teacher_path())
        # Precisions side by side per method (not one precision after another): a drift of the machine over the
        # check then cannot pass for a precision's speed-up.
        for name in methods:
            for precision in precisions:
                if spent():
                    runs.append({"kind": "synth", "method": name, "precision": precision, "error": "skipped: budget"})
                    continue
                timed(synth_run, f"{name}-{precision}", {"extra": _method_args(name, smoke, WARMUP_STEPS)},
                      name=name, precision=precision, teacher=teacher, device=device,
                      extra=_method_args(name, smoke, max_steps), batches=1 if smoke else 2)
        for precision in precisions:
            if not spent():
                model = tmp / "ddpm" if (tmp / "ddpm").exists() else tiny_ddpm(tmp / "ddpm")
                diff_args = ["--diffusion", str(model), "--batch-size", "2" if smoke else "16",
                             "--num-inference-steps", "2" if smoke else "10", "--proxy-student", "resnet8",
                             "--kd-steps", "1"]
                timed(synth_run, f"diffdfkd-{precision}", {"batches": 1}, name="diffdfkd", precision=precision,
                      teacher=teacher, device=device, extra=diff_args, batches=1 if smoke else 2)
            source = tmp / f"gmi-{precision}"
            if not spent() and (source / "manifest.json").exists():
                timed(distill_run, f"student-{precision}", {}, shards=source, precision=precision, device=device,
                      smoke=smoke)
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        source = tmp / f"gmi-{precisions[0]}"
        if gpus >= 2 and not spent() and (source / "manifest.json").exists():
            record(torchrun_distill(source, tmp / "student-ddp", gpus, budget - (time.perf_counter() - started)))
    report["errors"] = sum(1 for r in runs if r.get("error") and not r["error"].startswith("skipped"))
    report["speedup_over_fp32"] = speedups(runs)
    report["total_seconds"] = round(time.perf_counter() - started, 2)
    write_json_atomic(out_json, report, indent=1)
    write_atomic(out_json.with_suffix(".md"), markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    """The check as a table: one row per method, images/s (and peak GPU memory) per precision, bf16 over fp32."""
    precisions = list(dict.fromkeys(r["precision"] for r in report["runs"]))
    methods = list(dict.fromkeys(r["method"] for r in report["runs"]))
    cells = {(r["method"], r["precision"]): r for r in report["runs"]}

    def cell(method: str, precision: str) -> str:
        run = cells.get((method, precision))
        if run is None:
            return "–"
        if run.get("error"):
            return "skipped" if run["error"].startswith("skipped") else "error"
        memory = run.get("peak_gpu_memory_bytes")
        return f"{run['images_per_second']:,.1f}" + (f" ({memory / 2**20:,.0f} MB)" if memory else "")

    ratios = report.get("speedup_over_fp32", {})
    reduced = [p for p in precisions if p != "fp32"] if "fp32" in precisions else []
    header = ["method", *(f"{p} images/s (peak)" for p in precisions), *(f"{p} / fp32" for p in reduced)]
    lines = [f"# GPU check: {report['device']}, torch {report['torch']}", "",
             ("Smoke run: tiny networks on the CPU" if report["smoke"] else "Each method for two batches at its "
              f"paper batch size, step counts capped at {report['max_steps']}") + f"; {report['total_seconds']} s in "
             f"all, {sum(w['seconds'] for w in report.get('warm_ups', [])):.1f} s of it warm-up runs.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        row = [method, *(cell(method, p) for p in precisions),
               *(f"{ratios[method][p]:.2f}x" if p in ratios.get(method, {}) else "–" for p in reduced)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--smoke", action="store_true", help="on the CPU, tiny networks, bf16 only: seconds")
    parser.add_argument("--precisions", default=None, help="comma-separated "
                        "[default: fp32,bf16,fp16; bf16 with --smoke]")
    parser.add_argument("--methods", default=None, help=f"[default: all; {','.join(SMOKE_METHODS)} with --smoke]")
    parser.add_argument("--max-steps", type=int, default=50, help="cap on each batch's step counts")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later runs are skipped")
    parser.add_argument("--teacher", default=None, help="[default: the shipped WRN-16-2; a tiny one with --smoke]")
    args = parser.parse_args(argv)
    precisions = (args.precisions or ("bf16" if args.smoke else "fp32,bf16,fp16")).split(",")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched: the check builds what it loads
    methods = (args.methods or ",".join(SMOKE_METHODS if args.smoke else METHODS)).split(",")
    report = check(args.out, args.smoke, precisions, methods, args.max_steps, args.budget,
                   args.teacher)
    print(f"{args.out}: {len(report['runs'])} runs, {report['errors']} errors, {report['total_seconds']} s")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

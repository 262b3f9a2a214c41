"""Run a benchmark pipeline file and record a results table (markdown + JSON).

    python -m pipelines.benchmark pipelines/fmnist32_cpu.toml [--rows "d2cip;gmi"] [--fresh]

Each row goes through the two public commands exactly as a user runs them: ``synth run METHOD`` into its
own dataset directory, then ``distill run --shards DIR`` with the same student, epochs and batch size for
every row, evaluated on the real test set. Two reference rows train the same student on the same number of
*real* images: on their labels, and by KD from the teacher (the ceiling for any synthetic set of that size).

A row runs once per seed (``seeds`` in ``[benchmark]`` or on the row; the seed drives synthesis and
distillation alike) and reports the mean accuracy with its standard deviation and range, because
single-seed differences of a few points are noise at these budgets. Row options:

* ``options``: method options over the method's CPU budget (its ``cpu_budget``);
* ``prior_from = "ROW"``: a D2CIP row reuses the stage-1 prior of ROW's dataset of the same seed
  (``synth run d2cip --prior``), so ablations of stage 2 share one stage 1; its synthesis time then
  excludes stage 1, and the table says so;
* ``match_time_of = "ROW"``: scales this row's per-batch steps so that its synthesis wall time equals ROW's
  (same seed), for comparisons at equal time;
* ``condensed_ipc = N``: first ``synth condense --data REAL_DATA --ipc N`` (once per N and seed, settings from
  the ``[condense]`` table), then the row runs with ``--condensed`` on it (``options = { fa_weight = 0 }``: the
  naive-mixing baseline); with ``kind = "condensed-only"`` the row instead trains the student on the condensed
  images alone (``distill train --data imagefolder:DIR --teacher T``: KD from the teacher, no synthesis).

Figures recorded per row: student test accuracy, student/teacher ratio, synthesis wall time and images/s,
distillation images/s, peak memory of each stage, bytes per stored sample, teacher agreement and
separability. Finished runs are reused on a re-run (their metrics files are on disk) unless ``--fresh`` is
given, so a killed benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch

import realdata
import zoo
from synth.core.registry import get_method
from synth.presets import preset_values

from .lanes import run_in_lanes


def _run(command: list[str], log: Path) -> float:
    """Runs a CLI command, its output to ``log``; returns wall seconds; raises with the log's tail on failure."""
    started = time.perf_counter()
    with log.open("w") as handle:
        handle.write(" ".join(command) + "\n")
        handle.flush()
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"command failed ({result.returncode}): {' '.join(command)}\n{tail}")
    return time.perf_counter() - started


def _worst_class(per_class: list[float | None] | None) -> float | None:
    """The lowest per-class teacher agreement (a class the method fails to make shows here, not in the mean)."""
    values = [v for v in per_class or [] if v is not None]
    return min(values) if values else None


def _train_share(metrics: dict[str, Any]) -> float | None:
    """Of distillation's wall time, the share spent training (the rest: start-up, data, evaluation)."""
    train, wall = metrics.get("train_seconds"), metrics.get("wall_seconds")
    return train / wall if train is not None and wall else None


def _synth(*args: str) -> list[str]:
    return [sys.executable, "-m", "synth", *args]


def _distill(*args: str) -> list[str]:
    return [sys.executable, "-m", "distill.cli", *args]


@torch.no_grad()
def teacher_accuracy(teacher_path: Path, eval_data: str) -> float:
    teacher = zoo.load_classifier(teacher_path).eval()
    test = realdata.load(eval_data, split="test")
    correct = 0
    for start in range(0, len(test.labels), 1000):
        x = torch.from_numpy(test.images[start:start + 1000]).permute(0, 3, 1, 2).float() / 255
        correct += int((teacher(x).argmax(1).numpy() == test.labels[start:start + 1000]).sum())
    return correct / len(test.labels)


def _toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def write_row_config(path: Path, method: str, options: dict[str, Any]) -> None:
    lines = [f"[synth.{method}]"] + [f"{key} = {_toml_value(value)}" for key, value in options.items()]
    path.write_text("\n".join(lines) + "\n")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _spread(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "min": float(array.min()), "max": float(array.max()), "n": len(array)}


class Benchmark:
    def __init__(self, pipeline: dict[str, Any], fresh: bool):
        self.spec = pipeline["benchmark"]
        self.budget = pipeline["budget"]
        self.condense = pipeline.get("condense", {})
        self._lock = threading.RLock()
        self._condense_locks: dict[Path, threading.Lock] = {}
        self.rows = pipeline.get("rows", [])
        self.out = Path(self.spec["out"])
        self.fresh = fresh
        self.teacher = Path(self.spec["teacher"]) if self.spec.get("teacher") else zoo.default_teacher_path()
        self.seeds = [int(s) for s in self.spec.get("seeds", [self.spec.get("seed", 0)])]
        self.results: dict[str, dict[str, Any]] = {}
        self.runs: dict[tuple[str, int], dict[str, Any]] = {}

    def run_dir(self, name: str, seed: int | None = None) -> Path:
        path = self.out / _slug(name) / (f"seed-{seed}" if seed is not None else "")
        if self.fresh and path.exists() and (name, seed) not in self.runs:
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def distill_args(self, seed: int) -> list[str]:
        return ["--student", self.spec["student"], "--epochs", str(self.budget["distill_epochs"]),
                "--batch-size", str(self.budget["distill_batch_size"]), "--eval-data", self.spec["eval_data"],
                "--seed", str(seed), "--eval-every", str(self.budget.get("eval_every", 1)), "--quiet"]

    def reference_rows(self) -> None:
        acc = teacher_accuracy(self.teacher, self.spec["eval_data"])
        self.teacher_acc = acc
        self.results["teacher"] = {"name": f"teacher ({zoo.load_classifier(self.teacher).card.arch})",
                                   "accuracy": _spread([acc]), "ratio": 1.0}
        seed = self.seeds[0]
        for name, extra in (("student on real labels", []), ("KD on real images", ["--teacher", str(self.teacher)])):
            directory = self.run_dir(name)
            if not (directory / "metrics.json").exists():
                shutil.rmtree(directory)
                args = ["train", "--data", self.spec["real_data"], "--arch", self.spec["student"], "--out",
                        str(directory), "--max-train-samples", str(self.budget["num_images"]),
                        "--epochs", str(self.budget["distill_epochs"]),
                        "--batch-size", str(self.budget["distill_batch_size"]),
                        "--eval-data", self.spec["eval_data"], "--seed", str(seed),
                        "--eval-every", str(self.budget.get("eval_every", 1)), "--quiet", *extra]
                directory.mkdir(parents=True)
                _run(_distill(*args), self.out / f"{directory.name}.log")
            metrics = json.loads((directory / "metrics.json").read_text())
            self.results[name] = {
                "name": f"{self.spec['student']}: {name} ({self.budget['num_images']} real images)",
                "accuracy": _spread([metrics["final_accuracy"]]), "ratio": metrics["final_accuracy"] / acc,
                "distill_images_per_second": metrics.get("images_per_second"),
                "distill_peak_memory_bytes": metrics.get("peak_memory", {}).get("bytes"),
            }

    def condensed_set(self, ipc: int, seed: int) -> Path:
        """``synth condense`` of the real training split, ``ipc`` images per class (made once, then reused)."""
        path = self.out / "condensed" / f"ipc-{ipc}-seed-{seed}"
        with self._lock:
            lock = self._condense_locks.setdefault(path, threading.Lock())
        with lock:  # rows in parallel lanes share one condensed set; different sets are made side by side
            self._condense(path, ipc, seed)
        return path

    def _condense(self, path: Path, ipc: int, seed: int) -> None:
        if not (path / "condense.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            settings = [arg for key, value in self.condense.items()
                        for arg in (f"--{key.replace('_', '-')}", str(value))]
            _run(_synth("condense", "--data", self.spec["real_data"], "--ipc", str(ipc), "--out", str(path),
                        "--seed", str(seed), "--quiet", *settings), path.parent / f"{path.name}.log")

    def condensed_only_run(self, row: dict[str, Any], seed: int) -> dict[str, Any]:
        """The student trained on the condensed images alone, by KD from the teacher."""
        condensed = self.condensed_set(int(row["condensed_ipc"]), seed)
        student = self.run_dir(row["name"], seed) / "student"
        if not (student / "metrics.json").exists():
            shutil.rmtree(student, ignore_errors=True)
            _run(_distill("train", "--data", f"imagefolder:{condensed}", "--arch", self.spec["student"],
                          "--teacher", str(self.teacher), "--out", str(student),
                          *self.distill_args(seed)[2:]), student.parent / "distill.log")
        metrics = json.loads((student / "metrics.json").read_text())
        return {"method": "condense", "seed": seed, "options": {"ipc": row["condensed_ipc"]}, "matched": False,
                "shared_prior": False, "accuracy": metrics["final_accuracy"],
                "distill_images_per_second": metrics.get("images_per_second"),
                "distill_peak_memory_bytes": metrics.get("peak_memory", {}).get("bytes")}

    def row_options(self, row: dict[str, Any], seed: int) -> dict[str, Any]:
        method = row["method"]
        options = {**preset_values("cpu", get_method(method))[0], **row.get("options", {})}
        if row.get("condensed_ipc"):
            options["condensed"] = str(self.condensed_set(int(row["condensed_ipc"]), seed))
        if row.get("match_time_of"):
            target = self.runs[(row["match_time_of"], seed)]["synthesis_seconds"]
            base = next(r for (name, s), r in self.runs.items()
                        if s == seed and r["method"] == method and not r["matched"] and not r["shared_prior"])
            steps_key = "inversion_steps" if "inversion_steps" in options else "iterations"
            options[steps_key] = max(1, round(options[steps_key] * target / base["synthesis_seconds"]))
        return options

    def method_run(self, row: dict[str, Any], seed: int) -> dict[str, Any]:
        name, method = row["name"], row["method"]
        directory = self.run_dir(name, seed)
        dataset, student = directory / "dataset", directory / "student"
        options = self.row_options(row, seed)
        extra: list[str] = []
        if row.get("prior_from"):
            source = self.run_dir(row["prior_from"], seed) / "dataset" / "prior.pt"
            extra = ["--prior", str(source)]
        timing = directory / "synth_seconds.json"
        manifest_path = dataset / "manifest.json"
        complete = manifest_path.exists() and json.loads(manifest_path.read_text()).get("complete")
        if not (complete and timing.exists()):
            if dataset.exists():
                shutil.rmtree(dataset)
            config = directory / "synth.toml"
            write_row_config(config, method, options)
            seconds = _run(_synth("run", method, "--out", str(dataset), "--teacher", str(self.teacher),
                                  "--config", str(config), "--preset", "cpu",
                                  "--num-images", str(self.budget["num_images"]),
                                  "--shard-size", str(self.budget["shard_size"]), "--seed", str(seed), "--quiet",
                                  *extra),
                           directory / "synth.log")
            timing.write_text(json.dumps({"seconds": seconds}))
        seconds = json.loads(timing.read_text())["seconds"]
        if not (student / "metrics.json").exists():
            if student.exists():
                shutil.rmtree(student)
            _run(_distill("run", "--shards", str(dataset), "--out", str(student), *self.distill_args(seed)),
                 directory / "distill.log")
        manifest = json.loads(manifest_path.read_text())
        metrics = json.loads((student / "metrics.json").read_text())
        summary = manifest.get("summary", {})
        return {
            "method": method, "seed": seed, "options": options, "matched": bool(row.get("match_time_of")),
            "shared_prior": bool(row.get("prior_from")),
            "accuracy": metrics["final_accuracy"],
            "synthesis_seconds": seconds,
            "synthesis_images_per_second": manifest["num_samples"] / seconds,
            "synthesis_peak_memory_bytes": summary.get("peak_memory_bytes"),
            "teacher_agreement": summary.get("teacher_agreement"),
            "worst_class_agreement": _worst_class(summary.get("per_class_agreement")),
            "mean_entropy": summary.get("mean_entropy"),
            "pairwise_separability": summary.get("diversity", {}).get("pairwise_separability"),
            "distill_images_per_second": metrics.get("images_per_second"),
            "distill_train_share": _train_share(metrics),
            "distill_peak_memory_bytes": metrics.get("peak_memory", {}).get("bytes"),
            "bytes_per_sample": sum(s["bytes"] for s in manifest["shards"]) / manifest["num_samples"],
        }

    def method_row(self, row: dict[str, Any]) -> None:
        seeds = [int(s) for s in row.get("seeds", self.seeds)]
        runs = []
        for seed in seeds:
            only = row.get("kind") == "condensed-only"
            run = self.condensed_only_run(row, seed) if only else self.method_run(row, seed)
            self.runs[(row["name"], seed)] = run
            runs.append(run)
            made = f"  synthesis {run['synthesis_seconds']:.0f} s" if run.get("synthesis_seconds") is not None else ""
            print(f"   {row['name']}, seed {seed}: accuracy {run['accuracy']:.2%}{made}", flush=True)

        def mean(key: str) -> float | None:
            values = [r[key] for r in runs if r.get(key) is not None]
            return float(np.mean(values)) if values else None

        accuracy = _spread([r["accuracy"] for r in runs])
        self.results[row["name"]] = {
            "name": row["name"] + (" (stage 1 shared)" if row.get("prior_from") else ""),
            "method": row["method"], "runs": runs, "accuracy": accuracy,
            "ratio": accuracy["mean"] / self.teacher_acc,
            **{key: mean(key) for key in ("synthesis_seconds", "synthesis_images_per_second",
                                          "synthesis_peak_memory_bytes", "teacher_agreement",
                                          "worst_class_agreement", "mean_entropy",
                                          "pairwise_separability", "distill_images_per_second", "distill_train_share",
                                          "distill_peak_memory_bytes", "bytes_per_sample")},
        }

    def run(self, only: set[str] | None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.reference_rows()
        self.write()
        needed = set(only or [row["name"] for row in self.rows])
        for row in reversed(self.rows):  # rows a selected row reads from run too (from disk when finished)
            if row["name"] in needed:
                needed.update(filter(None, (row.get("prior_from"), row.get("match_time_of"))))
        rows = [row for row in self.rows if row["name"] in needed]
        lanes = int(self.budget.get("lanes", 1))
        if lanes > 1 and any(row.get("prior_from") or row.get("match_time_of") for row in rows):
            raise ValueError("lanes > 1 needs rows that do not read each other's results (prior_from, match_time_of)")
        run_in_lanes(rows, self._row_and_write, lanes)

    def _row_and_write(self, row: dict[str, Any]) -> None:
        print(f"== {row['name']}", flush=True)
        self.method_row(row)
        with self._lock:
            self.write()

    def write(self) -> None:
        environment = {"python": platform.python_version(), "torch": torch.__version__,
                       "cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
                       "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                       else f"CPU, {os.cpu_count()} cores"}
        payload = {"benchmark": self.spec, "budget": self.budget, "environment": environment, "rows": self.results}
        (self.out / "results.json").write_text(json.dumps(payload, indent=2))
        (self.out / "results.md").write_text(format_table(self.spec, self.budget, self.results, environment))


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return {"pct": f"{value:.2%}", "ratio": f"{value:.3f}", "int": f"{value:,.0f}", "mb": f"{value / 2**20:,.0f}",
            "s": f"{value:,.0f}", "f2": f"{value:.2f}", "f3": f"{value:.3f}"}[kind]


def _accuracy_cell(spread: dict[str, float]) -> str:
    if spread["n"] == 1:
        return f"{spread['mean']:.2%}"
    return (f"{spread['mean']:.2%} ± {spread['std'] * 100:.2f} ({spread['min']:.1%}–{spread['max']:.1%}, "
            f"n={spread['n']})")


def format_table(spec: dict[str, Any], budget: dict[str, Any], results: dict[str, dict[str, Any]],
                 environment: dict[str, Any]) -> str:
    lines = [
        f"# {spec.get('title', spec['name'])}",
        "",
        f"Teacher and budgets shared by every row: {budget['num_images']} images per set, student "
        f"{spec['student']}, {budget['distill_epochs']} epochs at batch {budget['distill_batch_size']}; accuracy on "
        f"the real {spec['eval_data']} test set as mean ± standard deviation (range, number of seeds; each seed "
        f"drives synthesis and distillation). Machine: {environment['device']}, torch {environment['torch']}, "
        f"{environment['cpu_threads']} threads.",
        "",
        "| row | accuracy | student/teacher | synthesis s | synthesis img/s | synthesis peak MB | distill img/s "
        "| distill train/wall | distill peak MB | bytes/sample | teacher agreement | worst class | entropy "
        "| separability |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        lines.append(
            f"| {r['name']} | {_accuracy_cell(r['accuracy'])} | {_fmt(r.get('ratio'), 'ratio')} "
            f"| {_fmt(r.get('synthesis_seconds'), 's')} | {_fmt(r.get('synthesis_images_per_second'), 'f2')} "
            f"| {_fmt(r.get('synthesis_peak_memory_bytes'), 'mb')} | {_fmt(r.get('distill_images_per_second'), 'int')} "
            f"| {_fmt(r.get('distill_train_share'), 'f2')} "
            f"| {_fmt(r.get('distill_peak_memory_bytes'), 'mb')} | {_fmt(r.get('bytes_per_sample'), 'int')} "
            f"| {_fmt(r.get('teacher_agreement'), 'pct')} | {_fmt(r.get('worst_class_agreement'), 'pct')} "
            f"| {_fmt(r.get('mean_entropy'), 'f2')} "
            f"| {_fmt(r.get('pairwise_separability'), 'f3')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", type=Path, help="benchmark pipeline file (TOML), e.g. pipelines/fmnist32_cpu.toml")
    parser.add_argument("--rows", default=None,
                        help="row names to run, separated by semicolons (names may hold commas) [default: all]")
    parser.add_argument("--fresh", action="store_true", help="recompute rows even if their results are on disk")
    args = parser.parse_args(argv)
    pipeline = tomllib.loads(args.pipeline.read_text())
    if "totals" in pipeline.get("budget", {}):  # an equal-wall-time pipeline
        from . import walltime

        walltime.main(argv)
        return
    benchmark = Benchmark(pipeline, args.fresh)
    benchmark.run({name.strip() for name in args.rows.split(";")} if args.rows else None)
    print((benchmark.out / "results.md").read_text())


if __name__ == "__main__":
    main()

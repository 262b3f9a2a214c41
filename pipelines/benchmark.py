"""Run a benchmark pipeline file and record a results table (markdown + JSON).

    python -m pipelines.benchmark pipelines/fmnist32_cpu.toml [--rows "d2cip;gmi"] [--fresh] [--plan]

Equal images. Each row goes through the two public commands exactly as a user runs them: ``synth run METHOD``
into its own dataset directory, then ``distill run --shards DIR`` with the same student, epochs and batch size
for every row, evaluated on the real test set. Two reference rows train the same student on the same number of
*real* images: on their labels, and by KD from the teacher (the ceiling for any synthetic set of that size).
A file with ``totals`` in ``[budget]`` is an equal-wall-time benchmark and goes to ``pipelines/walltime.py``.

A row runs once per seed (``seeds`` in ``[benchmark]`` or on the row; the seed drives synthesis and distillation
alike); the table (``pipelines/tables.py``) gives mean accuracy with its spread, ranks the rows, and marks one of
under 3 seeds. Every (row, seed) is one run; ``[budget] lanes`` of them run at a time, ``threads_per_lane``
threads each, each lane pinned to its own cores; a file asking for more threads than the machine has cores is
refused (``pipelines/lanes.py``). Each run's CPU seconds are recorded beside its wall seconds: CPU/wall well
under the lane's threads means the run was starved.

``[budget] preset`` is the synthesis preset of every row: ``cpu`` (default; each method's CPU budget) or
``paper`` (each method's paper hyperparameters and iteration counts, at the file's ``num_images``).
``[teacher]`` trains the teacher first with ``distill train`` (``pipelines/runs.py``: ``resolve_teacher``). Row options:

* ``options``: method options over the preset;
* ``prior_from = "ROW"``: a D2CIP row reuses the stage-1 prior of ROW's dataset of the same seed
  (``synth run d2cip --prior``), so ablations of stage 2 share one stage 1; its synthesis time then
  excludes stage 1, and the table says so;
* ``match_time_of = "ROW"``: scales the per-batch steps so that synthesis takes as long as ROW's (same seed);
* ``condensed_ipc = N``: first ``synth condense --data REAL_DATA --ipc N`` (once per N and seed, settings from
  the ``[condense]`` table), then the row runs with ``--condensed`` on it (``options = { fa_weight = 0 }``: the
  naive-mixing baseline); with ``kind = "condensed-only"`` the row instead trains the student on the condensed
  images alone (``distill train --data imagefolder:DIR --teacher T``: KD from the teacher, no synthesis).

A run that reads another (``prior_from``, ``match_time_of``) waits for it; a free lane meanwhile takes the next
run that can start. Finished runs are reused on a re-run (their metrics on disk) unless ``--fresh``, and a killed
synthesis continues its dataset (its seconds so far counted), so a killed benchmark continues, D2CIP's hours of
stage 1 included.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from atomicio import write_json_atomic

from . import tables, walltime
from .lanes import Lane, OversubscribedError, add_lane_arguments, apply_lane_arguments, plan_lanes, run_in_lanes
from .runs import (
    check_reused_options,
    check_row_names,
    children_stopped_on_termination,
    continued_seconds,
    distill,
    environment,
    read_time,
    resolve_teacher,
    reused_commit,
    run_command,
    slug,
    synth,
    teacher_accuracy,
    teacher_arch,
    train_share,
    worst_class,
    write_results,
    write_results_file,
    write_row_config,
)

REFERENCES = ("student on real labels", "KD on real images")
Unit = tuple[dict[str, Any], int | None]  # (row, seed); seed None: a reference row


class Benchmark:
    def __init__(self, pipeline: dict[str, Any], fresh: bool, cores: int | None = None, source: str = ""):
        self.pipeline = pipeline
        self.spec, self.budget = pipeline["benchmark"], pipeline["budget"]
        self.plan = plan_lanes(self.budget, cores, source)  # refuses an over-subscribed file before anything runs
        self.condense = pipeline.get("condense", {})
        self.preset = self.budget.get("preset", "cpu")
        self.rows = pipeline.get("rows", [])
        self.by_name = {row["name"]: row for row in self.rows}
        for row in self.rows:
            for source_row in filter(None, (row.get("prior_from"), row.get("match_time_of"))):
                if source_row not in self.by_name:
                    raise ValueError(f"row {row['name']!r} reads row {source_row!r}, which the file does not have")
        self.out = Path(self.spec["out"])
        self.fresh = fresh
        self.seeds = [int(s) for s in self.spec.get("seeds", [self.spec.get("seed", 0)])]
        self._lock = threading.RLock()
        self._condense_locks: dict[Path, threading.Lock] = {}
        self.runs: dict[tuple[str, int], dict[str, Any]] = {}
        self.references: dict[str, dict[str, Any]] = {}
        self.teacher_acc: float | None = None
        self.teacher: Path | None = None
        self.teacher_arch = ""

    # -- which runs, in which order ------------------------------------------------------------------------------

    def row_seeds(self, row: dict[str, Any]) -> list[int]:
        return [int(s) for s in row.get("seeds", self.seeds)]

    def match_base(self, row: dict[str, Any]) -> str:
        """The plain row of the same method whose synthesis time a ``match_time_of`` row scales its steps by."""
        for other in self.rows:
            if (other["method"] == row["method"] and other is not row and not other.get("match_time_of")
                    and not other.get("prior_from") and other.get("kind") != "condensed-only"):
                return other["name"]
        raise ValueError(f"row {row['name']!r}: match_time_of needs a plain {row['method']} row to scale from")

    def sources(self, row: dict[str, Any]) -> list[str]:
        if row.get("match_time_of"):
            return [row["match_time_of"], self.match_base(row)]
        return [row["prior_from"]] if row.get("prior_from") else []

    def units(self, only: set[str] | None) -> list[Unit]:
        check_row_names(only, self.rows)
        needed = set(only or self.by_name)
        for row in reversed(self.rows):  # rows a selected row reads from run too (from disk when finished)
            if row["name"] in needed:
                needed.update(self.sources(row))
        references: list[Unit] = [({"name": name, "kind": "reference"}, None) for name in REFERENCES]
        return references + [(row, seed) for row in self.rows if row["name"] in needed for seed in self.row_seeds(row)]

    @staticmethod
    def key(unit: Unit) -> tuple[str, int | None]:
        return unit[0]["name"], unit[1]

    def needs(self, unit: Unit) -> list[tuple[str, int | None]]:
        row, seed = unit
        return [] if seed is None else [(name, seed) for name in self.sources(row)]

    # -- the runs -----------------------------------------------------------------------------------------------

    def run_path(self, name: str, seed: int | None = None) -> Path:
        return self.out / slug(name) / (f"seed-{seed}" if seed is not None else "")

    def run_dir(self, name: str, seed: int | None = None) -> Path:
        path = self.run_path(name, seed)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def finished(self, name: str, seed: int) -> dict[str, Any] | None:
        """A run's figures: from this sitting, or from an earlier one (its ``run.json``), so that a sitting
        with ``--rows`` still writes the whole file's table."""
        if (name, seed) in self.runs:
            return self.runs[(name, seed)]
        saved = self.run_path(name, seed) / "run.json"
        return json.loads(saved.read_text()) if saved.exists() else None

    def precision_args(self, row: dict[str, Any]) -> list[str]:
        """``--precision`` for both stages: the row's ``precision``, else ``[budget] precision``, else none
        (the commands' own default)."""
        precision = row.get("precision", self.budget.get("precision"))
        return ["--precision", str(precision)] if precision else []

    def distill_args(self, seed: int) -> list[str]:
        return ["--student", self.spec["student"], "--epochs", str(self.budget["distill_epochs"]),
                "--batch-size", str(self.budget["distill_batch_size"]), "--eval-data", self.spec["eval_data"],
                "--seed", str(seed), "--eval-every", str(self.budget.get("eval_every", 1)), "--quiet"]

    def reference_run(self, name: str, lane: Lane) -> dict[str, Any]:
        """The student on ``num_images`` real images: on their labels, or by KD from the teacher."""
        directory = self.run_dir(name)
        if not (directory / "metrics.json").exists():
            shutil.rmtree(directory)
            directory.mkdir(parents=True)
            extra = ["--teacher", str(self.teacher)] if name == "KD on real images" else []
            run_command(distill("train", "--data", self.spec["real_data"], "--arch", self.spec["student"],
                                "--out", str(directory), "--max-train-samples", str(self.budget["num_images"]),
                                *self.distill_args(self.seeds[0])[2:], *self.precision_args({}), *extra),
                        self.out / f"{directory.name}.log", lane)
        metrics = json.loads((directory / "metrics.json").read_text())
        return {"accuracy": metrics["final_accuracy"], "distill_images_per_second": metrics.get("images_per_second"),
                "distill_peak_memory_bytes": metrics.get("peak_memory", {}).get("bytes")}

    def condensed_set(self, ipc: int, seed: int, lane: Lane) -> Path:
        """``synth condense`` of the real training split, ``ipc`` images per class (made once, then reused)."""
        path = self.out / "condensed" / f"ipc-{ipc}-seed-{seed}"
        with self._lock:
            lock = self._condense_locks.setdefault(path, threading.Lock())
        with lock:  # rows in parallel lanes share one condensed set; different sets are made side by side
            if not (path / "condense.json").exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                settings = [arg for key, value in self.condense.items()
                            for arg in (f"--{key.replace('_', '-')}", str(value))]
                run_command(synth("condense", "--data", self.spec["real_data"], "--ipc", str(ipc), "--out",
                                  str(path), "--seed", str(seed), "--quiet", *settings),
                            path.parent / f"{path.name}.log", lane)
        return path

    def condensed_only_run(self, row: dict[str, Any], seed: int, lane: Lane) -> dict[str, Any]:
        """The student trained on the condensed images alone, by KD from the teacher."""
        condensed = self.condensed_set(int(row["condensed_ipc"]), seed, lane)
        student = self.run_dir(row["name"], seed) / "student"
        if not (student / "metrics.json").exists():
            shutil.rmtree(student, ignore_errors=True)
            run_command(distill("train", "--data", f"imagefolder:{condensed}", "--arch", self.spec["student"],
                                "--teacher", str(self.teacher), "--out", str(student),
                                *self.distill_args(seed)[2:]), student.parent / "distill.log", lane)
        metrics = json.loads((student / "metrics.json").read_text())
        return {"method": "condense", "seed": seed, "options": {"ipc": row["condensed_ipc"]}, "matched": False,
                "shared_prior": False, "accuracy": metrics["final_accuracy"],
                "distill_images_per_second": metrics.get("images_per_second"),
                "distill_peak_memory_bytes": metrics.get("peak_memory", {}).get("bytes")}

    def row_options(self, row: dict[str, Any], seed: int, lane: Lane) -> dict[str, Any]:
        from synth.core.registry import get_method  # here, not at import: the tables need no synth
        from synth.presets import preset_values

        method = row["method"]
        options = {**preset_values(self.preset, get_method(method))[0], **row.get("options", {})}
        if row.get("condensed_ipc"):
            options["condensed"] = str(self.condensed_set(int(row["condensed_ipc"]), seed, lane))
        if row.get("match_time_of"):
            target = self.finished(row["match_time_of"], seed)["synthesis_seconds"]  # type: ignore[index]
            base = self.finished(self.match_base(row), seed)["synthesis_seconds"]  # type: ignore[index]
            defaults = {f.name: f.default for f in fields(get_method(method).config_class)}
            steps_key = "inversion_steps" if "inversion_steps" in defaults else "iterations"
            steps = options.get(steps_key, defaults[steps_key])
            options[steps_key] = max(1, round(steps * target / base))
        return options

    def method_run(self, row: dict[str, Any], seed: int, lane: Lane) -> dict[str, Any]:
        name, method = row["name"], row["method"]
        directory = self.run_dir(name, seed)
        dataset, student = directory / "dataset", directory / "student"
        options = self.row_options(row, seed, lane)
        extra = ["--prior", str(self.run_dir(row["prior_from"], seed) / "dataset" / "prior.pt")] \
            if row.get("prior_from") else []
        timing, distill_timing = directory / "synth_seconds.json", directory / "distill_seconds.json"
        manifest_path = dataset / "manifest.json"
        complete = manifest_path.exists() and json.loads(manifest_path.read_text()).get("complete")
        config = directory / "synth.toml"
        if complete and timing.exists():
            check_reused_options(config, method, options, name)
        else:  # a killed attempt's dataset is continued (synth resumes it), or started again
            earlier = continued_seconds(dataset, config, method, options)
            if dataset.exists() and earlier is None:
                shutil.rmtree(dataset)
            write_row_config(config, method, options)
            spent = run_command(synth("run", method, "--out", str(dataset), "--teacher", str(self.teacher),
                                      "--config", str(config), "--preset", self.preset,
                                      "--num-images", str(self.budget["num_images"]),
                                      "--shard-size", str(self.budget["shard_size"]), "--seed", str(seed),
                                      "--quiet", *self.precision_args(row), *extra), directory / "synth.log", lane)
            write_results_file(timing, spent.after(earlier))
        if not (student / "metrics.json").exists():
            if student.exists():
                shutil.rmtree(student)
            spent = run_command(distill("run", "--shards", str(dataset), "--out", str(student),
                                        *self.distill_args(seed), *self.precision_args(row)),
                              directory / "distill.log", lane)
            write_results_file(distill_timing, spent)
        commit = reused_commit(timing, name, seed)
        synth_time = read_time(timing)
        distill_time = read_time(distill_timing) if distill_timing.exists() else None
        manifest = json.loads(manifest_path.read_text())
        metrics = json.loads((student / "metrics.json").read_text())
        summary = manifest.get("summary", {})
        return {
            "method": method, "seed": seed, "options": options, "matched": bool(row.get("match_time_of")),
            "shared_prior": bool(row.get("prior_from")), "preset": self.preset, "threads": synth_time.threads,
            "precision": manifest.get("method", {}).get("precision", metrics.get("precision")), "commit": commit,
            "accuracy": metrics["final_accuracy"],
            "synthesis_seconds": synth_time.wall_seconds, "synthesis_cpu_seconds": synth_time.cpu_seconds,
            "synthesis_cores": list(synth_time.cores), "synthesis_continued_from_seconds": synth_time.continued_from,
            "synthesis_images_per_second": manifest["num_samples"] / synth_time.wall_seconds,
            "synthesis_peak_memory_bytes": summary.get("peak_memory_bytes"),
            "teacher_agreement": summary.get("teacher_agreement"),
            "worst_class_agreement": worst_class(summary.get("per_class_agreement")),
            "mean_entropy": summary.get("mean_entropy"),
            "pairwise_separability": summary.get("diversity", {}).get("pairwise_separability"),
            "distill_seconds": distill_time.wall_seconds if distill_time else None,
            "distill_cpu_seconds": distill_time.cpu_seconds if distill_time else None,
            "distill_images_per_second": metrics.get("images_per_second"),
            "distill_train_share": train_share(metrics),
            "distill_peak_memory_bytes": metrics.get("peak_memory", {}).get("bytes"),
            "bytes_per_sample": sum(s["bytes"] for s in manifest["shards"]) / manifest["num_samples"],
        }

    def run_unit(self, unit: Unit, lane: Lane) -> None:
        row, seed = unit
        name = row["name"]
        if self.fresh:
            shutil.rmtree(self.run_path(name, seed), ignore_errors=True)
        print(f"== {name}" + (f" (seed {seed})" if seed is not None else "") + f", lane {lane.index}", flush=True)
        if seed is None:
            result = self.reference_run(name, lane)
        elif row.get("kind") == "condensed-only":
            result = self.condensed_only_run(row, seed, lane)
        else:
            result = self.method_run(row, seed, lane)
        made = f", synthesis {result['synthesis_seconds']:.0f} s" if result.get("synthesis_seconds") else ""
        print(f"   {name}{'' if seed is None else f', seed {seed}'}: accuracy {result['accuracy']:.2%}{made}",
              flush=True)
        with self._lock:
            if seed is None:
                self.references[name] = result
            else:
                self.runs[(name, seed)] = result
                write_json_atomic(self.run_path(name, seed) / "run.json", result, indent=2)
            self.write()

    def run(self, only: set[str] | None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.teacher = resolve_teacher(self.pipeline, self.out, self.plan.whole())
        self.teacher_acc = teacher_accuracy(self.teacher, self.spec["eval_data"])
        self.teacher_arch = teacher_arch(self.teacher)
        self.write()
        run_in_lanes(self.units(only), self.run_unit, self.plan, key=self.key, needs=self.needs)

    # -- the table ----------------------------------------------------------------------------------------------

    def results(self) -> dict[str, dict[str, Any]]:
        acc = self.teacher_acc or 0.0
        results: dict[str, dict[str, Any]] = {
            "teacher": {"name": f"teacher ({self.teacher_arch})",
                        "accuracy": tables.spread([acc]), "ratio": 1.0, "reference": True}}
        for name, ref in self.references.items():
            label = f"{self.spec['student']}: {name} ({self.budget['num_images']} real images)"
            results[name] = {**ref, "name": label, "accuracy": tables.spread([ref["accuracy"]]),
                             "ratio": ref["accuracy"] / acc, "reference": True}
        for row in self.rows:
            runs = [run for s in self.row_seeds(row) if (run := self.finished(row["name"], s)) is not None]
            if not runs:
                continue
            accuracy = tables.spread([r["accuracy"] for r in runs])
            results[row["name"]] = {
                "name": row["name"] + (" (stage 1 shared)" if row.get("prior_from") else "")
                + (" (continued after a kill)" if any(r.get("synthesis_continued_from_seconds") for r in runs) else ""),
                "method": row["method"], "runs": runs, "accuracy": accuracy, "ratio": accuracy["mean"] / acc,
                **{key: _mean(runs, key) for key in RUN_FIGURES}}
        return results

    def write(self) -> None:
        env = {**environment(self.plan),
               "run_threads": sorted({run["threads"] for run in self.runs.values() if run.get("threads")})}
        results = self.results()
        payload = {"benchmark": self.spec, "budget": self.budget, "environment": env,
                   "teacher": str(self.teacher), "rows": results}
        write_results(self.out, payload, tables.equal_images_table(self.spec, self.budget, results, env))


RUN_FIGURES = ("synthesis_seconds", "synthesis_cpu_seconds", "synthesis_images_per_second",
               "synthesis_peak_memory_bytes", "teacher_agreement", "worst_class_agreement", "mean_entropy",
               "pairwise_separability", "distill_seconds", "distill_cpu_seconds", "distill_images_per_second",
               "distill_train_share", "distill_peak_memory_bytes", "bytes_per_sample")


def _mean(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", type=Path, help="benchmark pipeline file (TOML), e.g. pipelines/fmnist32_cpu.toml")
    parser.add_argument("--rows", default=None,
                        help="row names to run, separated by semicolons (names may hold commas) [default: all]")
    parser.add_argument("--fresh", action="store_true", help="recompute rows even if their results are on disk")
    parser.add_argument("--plan", action="store_true", help="print the lanes and runs (and, at equal wall time, "
                        "the estimated wall time), run nothing")
    add_lane_arguments(parser)
    args = parser.parse_args(argv)
    pipeline = apply_lane_arguments(tomllib.loads(args.pipeline.read_text()), args)
    only = {name.strip() for name in args.rows.split(";")} if args.rows else None
    try:
        if "totals" in pipeline.get("budget", {}):  # an equal-wall-time pipeline
            with children_stopped_on_termination():
                walltime.run_file(pipeline, args.fresh, only, args.plan, str(args.pipeline))
            return
        benchmark = Benchmark(pipeline, args.fresh, source=str(args.pipeline))
    except OversubscribedError as error:  # a file's mistake, not the runner's: one line, no traceback
        parser.exit(2, f"error: {error}\n")
    if args.plan:
        units = benchmark.units(only)
        print(f"{args.pipeline}: {benchmark.plan.describe()}; {len(units)} runs (2 real-data references, then "
              f"rows x seeds); wall time depends on each method's images/s (pipelines/README.md has estimates)")
        return
    with children_stopped_on_termination():
        benchmark.run(only)
    print((benchmark.out / "results.md").read_text())


if __name__ == "__main__":
    main()

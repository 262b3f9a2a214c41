"""Equal-wall-time benchmark: for the same minutes on this machine, which method gives the better student?

    python -m pipelines.walltime pipelines/fmnist32_cpu_walltime.toml [--rows 'd2cip;fast-2'] [--fresh]

For every row (a method and its options) and every total budget T in ``[budget] totals`` (ascending), the
rule is: synthesis runs with ``synth run --time-budget share x T`` (continuing the row's dataset from the
previous budget, so the points of one row share their synthesis; it stops at the first shard boundary after
the budget, so a slow method overruns by up to one batch), then a fresh student is distilled with
``distill run --time-budget (1 - share) x T --budget-covers training``: that much training, then one
evaluation on the real test set that is timed and reported but not charged (it costs every method the same,
about half a minute on one core for 10k images, and at the smallest budgets would otherwise leave no time to
train). Distillation's budget does not shrink when synthesis overran: the overrun is the synthesis method's,
and shows in the measured total (the curve's x axis). Every figure is measured by
this script around the two public commands, in one run, on one machine.

``[budget] lanes = N`` runs N rows at a time, each with cores / N threads (two 1-thread lanes on a 2-core
machine: every method has one core and one neighbour, and the whole benchmark takes half the time). Rows that
should see the same machine must all fit in the lanes at once: a row queued behind others runs on a quieter
machine and gets more of it.

``seeds = [0, 1, 2]`` in ``[benchmark]`` (or in a row, for that row only) runs every row once per seed (seed
drives synthesis and distillation), each seed its own lane; tables then give accuracy as mean ± standard
deviation (range, n) and the plot the mean with the range as error bars. ``seed = N`` is one seed, kept for
older pipeline files (their folders have no ``seed-N`` level).

Recorded per point: images made, synthesis and distillation wall time, synthesis images/s, distillation
images/s, train seconds / wall seconds of distillation, student accuracy and student/teacher. Written as
``results.json``, ``results.md`` (one table per budget, and the curve's data) and ``accuracy_vs_walltime.png``
(student accuracy against total wall time, one line per method). Finished points are reused on a re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import threading
import tomllib
from pathlib import Path
from typing import Any

import torch

import zoo
from atomicio import write_atomic, write_json_atomic
from timebudget import format_duration, parse_duration

from .benchmark import _distill, _run, _slug, _synth, _worst_class, teacher_accuracy, write_row_config
from .lanes import run_in_lanes


class WallTimeBenchmark:
    def __init__(self, pipeline: dict[str, Any], fresh: bool):
        self.spec = pipeline["benchmark"]
        self.budget = pipeline["budget"]
        self.rows = pipeline["rows"]
        self.out = Path(self.spec["out"])
        self.teacher = Path(self.spec["teacher"]) if self.spec.get("teacher") else zoo.default_teacher_path()
        self.totals = sorted(parse_duration(t) for t in self.budget["totals"])
        self.share = float(self.budget["synthesis_share"])
        if not 0 < self.share < 1:
            raise ValueError("synthesis_share must be between 0 and 1")
        self.fresh = fresh
        self.lanes = int(self.budget.get("lanes", 1))
        self._lock = threading.Lock()

    def seeds(self, row: dict[str, Any]) -> list[int]:
        return [int(s) for s in row.get("seeds", self.spec.get("seeds", [self.spec.get("seed", 0)]))]

    def row_dir(self, row: dict[str, Any], seed: int) -> Path:
        directory = self.out / _slug(row["name"])
        return directory / f"seed-{seed}" if "seeds" in self.spec or "seeds" in row else directory

    def row(self, row: dict[str, Any], seed: int) -> None:
        name, method = row["name"], row["method"]
        directory = self.row_dir(row, seed)
        if self.fresh and directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dataset = directory / "dataset"
        config = directory / "synth.toml"
        write_row_config(config, method, row.get("options", {}))
        synth_wall = 0.0
        for total in self.totals:
            label = format_duration(total)
            point_dir = directory / f"total-{label}"
            point_file = point_dir / "point.json"
            if point_file.exists():
                point = json.loads(point_file.read_text())
                synth_wall = point["synthesis_wall_seconds"]
                continue
            point_dir.mkdir(parents=True, exist_ok=True)
            synth_wall += _run(_synth("run", method, "--out", str(dataset), "--teacher", str(self.teacher),
                                      "--config", str(config), "--preset", "cpu", "--num-images", "10000000",
                                      "--shard-size", str(self.budget["shard_size"]),
                                      "--time-budget", f"{self.share * total:.1f}s",
                                      "--seed", str(seed), "--quiet"),
                               point_dir / "synth.log")
            manifest = json.loads((dataset / "manifest.json").read_text())
            distill_budget = (1 - self.share) * total
            student = point_dir / "student"
            if student.exists():
                shutil.rmtree(student)
            distill_wall = _run(_distill("run", "--shards", str(dataset), "--out", str(student),
                                         "--student", self.spec["student"], "--eval-data", self.spec["eval_data"],
                                         "--epochs", str(self.budget["distill_max_epochs"]),
                                         "--batch-size", str(self.budget["distill_batch_size"]),
                                         "--time-budget", f"{distill_budget:.1f}s", "--budget-covers", "training",
                                         "--eval-every", "1000000",
                                         "--seed", str(seed),
                                         "--quiet"),
                                point_dir / "distill.log")
            metrics = json.loads((student / "metrics.json").read_text())
            distill_wall -= metrics.get("eval_seconds") or 0.0  # not charged (--budget-covers training)
            summary = manifest.get("summary", {})
            point = {
                "seed": seed, "total_budget_seconds": total, "images": manifest["num_samples"],
                "synthesis_wall_seconds": synth_wall,
                "synthesis_seconds": summary.get("synthesis_seconds"),
                "synthesis_images_per_second": manifest["num_samples"] / synth_wall,
                "distill_wall_seconds": distill_wall, "distill_epochs": metrics["epochs"],
                "distill_images_per_second": metrics.get("images_per_second"),
                "distill_train_seconds": metrics.get("train_seconds"),
                "distill_train_share": metrics.get("train_seconds", 0) / max(distill_wall, 1e-9),
                "distill_eval_seconds": metrics.get("eval_seconds"),
                "total_wall_seconds": synth_wall + distill_wall,
                "accuracy": metrics["final_accuracy"], "ratio": metrics["final_accuracy"] / self.teacher_acc,
                "teacher_agreement": summary.get("teacher_agreement"),
                "worst_class_agreement": _worst_class(summary.get("per_class_agreement")),
                "pairwise_separability": (summary.get("diversity") or {}).get("pairwise_separability"),
                "student_per_class_accuracy": metrics.get("per_class_accuracy"),
            }
            write_json_atomic(point_file, point, indent=2)
            print(f"   {name} (seed {seed}) @ {label}: {point['images']} images, accuracy {point['accuracy']:.2%}, "
                  f"wall {point['total_wall_seconds']:.0f} s", flush=True)

    def run(self, only: set[str] | None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.teacher_acc = teacher_accuracy(self.teacher, self.spec["eval_data"])
        units = [(row, seed) for row in self.rows if not only or row["name"] in only for seed in self.seeds(row)]
        run_in_lanes(units, self._row_and_write, self.lanes)

    def _row_and_write(self, unit: tuple[dict[str, Any], int]) -> None:
        row, seed = unit
        print(f"== {row['name']} (seed {seed})", flush=True)
        self.row(row, seed)
        with self._lock:
            self.write()

    def finished_points(self) -> dict[str, list[dict[str, Any]]]:
        """Every row's finished points on disk, in pipeline order: the tables cover rows run by other
        processes too (two 1-thread lanes side by side each run some rows into the same folder)."""
        found = {}
        for row in self.rows:
            files = [self.row_dir(row, seed) / f"total-{format_duration(t)}" / "point.json"
                     for seed in self.seeds(row) for t in self.totals]
            points = [json.loads(f.read_text()) for f in files if f.exists()]
            if points:
                found[row["name"]] = points
        return found

    def write(self) -> None:
        environment = {"python": platform.python_version(), "torch": torch.__version__,
                       "cpu_threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
                       "lanes": self.lanes,
                       "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                       else f"CPU, {os.cpu_count()} cores"}
        results = self.finished_points()
        payload = {"benchmark": self.spec, "budget": self.budget, "environment": environment,
                   "teacher_accuracy": self.teacher_acc, "rows": results}
        write_json_atomic(self.out / "results.json", payload, indent=2)
        write_atomic(self.out / "results.md",
                     format_tables(self.spec, self.budget, self.teacher_acc, results, environment))
        machine = environment["device"] + (f", {self.lanes} runs side by side" if self.lanes > 1 else "")
        plot_curves(results, self.teacher_acc, self.out / "accuracy_vs_walltime.png", machine)


def format_tables(spec: dict[str, Any], budget: dict[str, Any], teacher_acc: float,
                  results: dict[str, list[dict[str, Any]]], environment: dict[str, Any]) -> str:
    lines = [f"# {spec.get('title', spec['name'])}", "",
             f"Teacher {teacher_acc:.2%} on the real {spec['eval_data']} test set; student {spec['student']}; "
             f"synthesis gets {budget['synthesis_share']:.0%} of each total budget (`synth run --time-budget`, "
             f"stopping at the first shard after it), distillation the rest (`distill run --time-budget "
             f"--budget-covers training`: the final evaluation on the real test set, the same for every method, is "
             f"not charged; total s excludes it). Machine: "
             f"{environment['device']}, torch {environment['torch']}, {environment['cpu_threads']} threads per run, "
             f"{environment['lanes']} run(s) at a time.", ""]
    totals = sorted({p["total_budget_seconds"] for points in results.values() for p in points})
    several = any(len(_at(points, total)) > 1 for points in results.values() for total in totals)
    for total in totals:
        lines += [f"## Total budget {format_duration(total)}", ""]
        if several:
            lines += ["Figures other than accuracy are means over the seeds; accuracy is mean ± standard deviation "
                      "(range, seeds).", ""]
        lines += ["| method | images | synthesis s | synthesis img/s | distill s | distill epochs | distill img/s "
                  "| distill train/wall | total s | accuracy | student/teacher | teacher agreement | worst class |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, points in results.items():
            at = _at(points, total)
            if not at:
                continue
            p = {key: _mean([q.get(key) for q in at]) for key in at[0] if key != "student_per_class_accuracy"}
            agreement, worst = p.get("teacher_agreement"), p.get("worst_class_agreement")
            lines.append(
                f"| {name} | {p['images']:,.0f} | {p['synthesis_wall_seconds']:.0f} "
                f"| {p['synthesis_images_per_second']:.2f} | {p['distill_wall_seconds']:.0f} "
                f"| {p['distill_epochs']:.0f} | {p['distill_images_per_second'] or 0:,.0f} "
                f"| {p['distill_train_share']:.2f} | {p['total_wall_seconds']:.0f} "
                f"| {_spread([q['accuracy'] for q in at])} "
                f"| {p['ratio']:.3f} | {'–' if agreement is None else f'{agreement:.1%}'} "
                f"| {'–' if worst is None else f'{worst:.1%}'} |")
        lines.append("")
    if several:
        lines += ["## Every seed", "", "| method | seed | total budget | images | accuracy |", "|---|---|---|---|---|"]
        for name, points in results.items():
            for p in sorted(points, key=lambda q: (q["total_budget_seconds"], q.get("seed", 0))):
                lines.append(f"| {name} | {p.get('seed', '–')} | {format_duration(p['total_budget_seconds'])} "
                             f"| {p['images']:,} | {p['accuracy']:.2%} |")
        lines.append("")
    return "\n".join(lines)


def _at(points: list[dict[str, Any]], total: float) -> list[dict[str, Any]]:
    return [p for p in points if p["total_budget_seconds"] == total]


def _mean(values: list[Any]) -> Any:
    """Mean of the numbers (None if any is missing); the first value of anything else."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sum(values) / len(values)
    return None if any(v is None for v in values) else values[0]


def _spread(accuracies: list[float]) -> str:
    if len(accuracies) == 1:
        return f"{accuracies[0]:.2%}"
    std = statistics.stdev(accuracies)
    return (f"{statistics.fmean(accuracies):.2%} ± {std:.2%} "
            f"({min(accuracies):.2%}–{max(accuracies):.2%}, {len(accuracies)})")


def plot_curves(results: dict[str, list[dict[str, Any]]], teacher_acc: float, path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, points in results.items():
        groups = [_at(points, t) for t in sorted({p["total_budget_seconds"] for p in points})]
        x = [statistics.fmean(p["total_wall_seconds"] for p in g) / 60 for g in groups]
        y = [statistics.fmean(100 * p["accuracy"] for p in g) for g in groups]
        low = [m - min(100 * p["accuracy"] for p in g) for m, g in zip(y, groups, strict=True)]
        high = [max(100 * p["accuracy"] for p in g) - m for m, g in zip(y, groups, strict=True)]
        ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=name)
    ax.axhline(100 * teacher_acc, color="grey", linestyle="--", linewidth=1, label="teacher")
    ax.set_xlabel("total wall time, synthesis + distillation (minutes)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"Student accuracy at equal wall time ({machine})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", type=Path, help="pipeline file, e.g. pipelines/fmnist32_cpu_walltime.toml")
    parser.add_argument("--rows", default=None, help="row names to run, separated by semicolons [default: all]")
    parser.add_argument("--fresh", action="store_true", help="recompute points even if their results are on disk")
    args = parser.parse_args(argv)
    benchmark = WallTimeBenchmark(tomllib.loads(args.pipeline.read_text()), args.fresh)
    benchmark.run({name.strip() for name in args.rows.split(";")} if args.rows else None)
    print((benchmark.out / "results.md").read_text())


if __name__ == "__main__":
    main()

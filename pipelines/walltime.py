"""Equal-wall-time benchmark: for the same minutes on this machine, which method gives the better student?

    python -m pipelines.benchmark pipelines/fmnist32_cpu_decisive.toml [--rows 'd2cip;fast-2'] [--fresh] [--plan]

For every row (a method and its options), every seed and every total budget T in ``[budget] totals`` (or the
row's own ``totals``), the rule is: synthesis runs with ``synth run --time-budget share x T`` (continuing the
row's dataset from the previous point, so the points of one row share their synthesis; it stops at the first
shard boundary after the budget), then a fresh student is distilled with ``distill run --time-budget
(T - synthesis wall seconds) --budget-covers training`` (what synthesis left of T, nominally (1 - share) x T;
at least a tenth of that): that much training, then one evaluation on the real test set that
is timed and reported but not charged (it costs every method the same, about half a minute on one core for 10k
images). Every point records its synthesis and distillation wall seconds against their budgets and their CPU
seconds; a point whose total ran more than 5% over T is marked over budget, and its row is not ranked
(``pipelines/tables.py``).

The synthesis share: ``[budget] synthesis_share`` for every row, or a row's own ``synthesis_share``; or a
sweep, ``synthesis_shares = [0.5, 0.65, 0.8]`` (in ``[budget]`` or on a row): each row then runs at every
share (the shares' synthesis continuing one dataset, smallest first), the tables give one line per row and
share, and ``results.json`` / ``results.md`` name the share with the best mean accuracy per row
(``chosen_shares``). A later file fixes those with ``share_from = "pipelines/results/<sweep>.json"``: each row
takes its chosen share from there, and the file refuses to run a row the sweep did not choose for (its other rows run).

``[budget] lanes`` / ``threads_per_lane``: how many runs at a time, on how many cores each (never more threads
than cores, ``pipelines/lanes.py``); every (row, seed) is one run. ``seeds = [0, 1, 2]`` in ``[benchmark]``
(or in a row) runs every row once per seed, in ``seed-N`` folders (``seed = N``: one seed, old layout).
``[budget] preset``: the synthesis preset (default ``cpu``). ``[teacher]``: train the teacher first
(``pipelines/runs.py``). Finished points are reused on a re-run (a row whose options changed since is refused:
``--fresh --rows``); ``--plan`` prints the lanes and the wall time the remaining points will take.
``[benchmark] baselines = ["gmi", ...]`` adds a table of every row's lead over those rows, called *ahead* or
*behind* only beyond the seed spread (``tables.verdict``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import shutil
import threading
import tomllib
from pathlib import Path
from typing import Any

import shards
from atomicio import write_json_atomic
from timebudget import format_duration, parse_duration

from . import tables
from .lanes import Lane, OversubscribedError, add_lane_arguments, apply_lane_arguments, plan_lanes, run_in_lanes
from .runs import (
    check_reused_options,
    check_row_names,
    children_stopped_on_termination,
    continued_seconds,
    distill,
    environment,
    resolve_teacher,
    run_command,
    slug,
    synth,
    teacher_accuracy,
    worst_class,
    write_results,
    write_row_config,
)

#: Per point, beyond its budget: two process start-ups and the uncharged evaluation on 10k test images (about
#: 45 s on one core; pipelines/results/*walltime*.json show 110-150 s of evaluation at a fifth of a core).
POINT_OVERHEAD_SECONDS = 45.0
#: The least distillation a point gets, as a share of its nominal (1 - share) x T, when synthesis overran so far
#: that the total is lost anyway (the point is then marked over budget).
MIN_DISTILL_SHARE = 0.1


def load_chosen_shares(path: str | Path) -> dict[str, float]:
    """The shares a split sweep chose (its ``results.json``), by row name."""
    try:
        chosen = json.loads(Path(path).read_text()).get("chosen_shares")
    except FileNotFoundError:
        raise FileNotFoundError(f"share_from: {path} does not exist; run the split sweep first") from None
    if not chosen:
        raise ValueError(f"share_from: {path} holds no chosen_shares (is it a split sweep's results.json?)")
    return {name: float(share) for name, share in chosen.items()}


class WallTimeBenchmark:
    def __init__(self, pipeline: dict[str, Any], fresh: bool, cores: int | None = None, source: str = ""):
        self.pipeline = pipeline
        self.spec, self.budget, self.rows = pipeline["benchmark"], pipeline["budget"], pipeline["rows"]
        self.plan = plan_lanes(self.budget, cores, source)  # refuses an over-subscribed file before anything runs
        self.out = Path(self.spec["out"])
        self.totals = sorted(parse_duration(t) for t in self.budget["totals"])
        self.preset = self.budget.get("preset", "cpu")
        self.chosen = load_chosen_shares(self.budget["share_from"]) if self.budget.get("share_from") else None
        # A row share_from chose no share for yet has no points; it is refused only when asked to run (units).
        self.sweep = any(len(self.shares(row)) > 1 for row in self.rows if self.has_share(row))
        self.fresh = fresh
        self._lock = threading.Lock()
        self.teacher: Path | None = None
        self.teacher_acc = 0.0

    # -- what each row runs -------------------------------------------------------------------------------------

    def seeds(self, row: dict[str, Any]) -> list[int]:
        return [int(s) for s in row.get("seeds", self.spec.get("seeds", [self.spec.get("seed", 0)]))]

    def row_dir(self, row: dict[str, Any], seed: int) -> Path:
        directory = self.out / slug(row["name"])
        return directory / f"seed-{seed}" if "seeds" in self.spec or "seeds" in row else directory

    def has_share(self, row: dict[str, Any]) -> bool:
        """False only for a row whose share comes from a split sweep that has not run it yet."""
        return "synthesis_shares" in row or "synthesis_share" in row or self.chosen is None or \
            row["name"] in self.chosen

    def shares(self, row: dict[str, Any]) -> list[float]:
        if "synthesis_shares" in row or "synthesis_share" in row:
            values = row.get("synthesis_shares", [row.get("synthesis_share")])
        elif self.chosen is not None:
            if row["name"] not in self.chosen:
                raise ValueError(f"share_from {self.budget['share_from']} chose no share for row {row['name']!r}: "
                                 "run the split sweep for it first, or give the row its own synthesis_share")
            values = [self.chosen[row["name"]]]
        elif "synthesis_shares" in self.budget:
            values = self.budget["synthesis_shares"]
        elif "synthesis_share" in self.budget:
            values = [self.budget["synthesis_share"]]
        else:
            raise ValueError("[budget] needs synthesis_share, synthesis_shares or share_from")
        shares = [float(v) for v in values]
        if not all(0 < s < 1 for s in shares):
            raise ValueError(f"synthesis_share must be between 0 and 1, got {shares} (row {row['name']!r})")
        return shares

    def points(self, row: dict[str, Any]) -> list[tuple[float, float]]:
        """(total, share) of the row's points, by synthesis budget: each continues the previous one's dataset."""
        totals = sorted(parse_duration(t) for t in row["totals"]) if "totals" in row else self.totals
        return sorted(((t, s) for t in totals for s in self.shares(row)), key=lambda p: (p[0] * p[1], p[0]))

    def point_dir(self, row: dict[str, Any], seed: int, total: float, share: float) -> Path:
        name = f"total-{format_duration(total)}" + (f"-share-{round(share * 100)}" if self.sweep else "")
        return self.row_dir(row, seed) / name

    def display_name(self, row: dict[str, Any], share: float) -> str:
        return f"{row['name']} @ {share:.0%}" if self.sweep else row["name"]

    # -- running ------------------------------------------------------------------------------------------------

    def row(self, row: dict[str, Any], seed: int, lane: Lane) -> None:
        name, method = row["name"], row["method"]
        directory = self.row_dir(row, seed)
        if self.fresh and directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dataset, config = directory / "dataset", directory / "synth.toml"
        options = row.get("options", {})
        if any((self.point_dir(row, seed, t, s) / "point.json").exists() for t, s in self.points(row)):
            check_reused_options(config, method, options, name)
        elif dataset.exists() and continued_seconds(dataset, config, method, options) is None:
            shutil.rmtree(dataset)  # a killed first attempt with other options, or one that saved nothing
        write_row_config(config, method, options)
        synth_wall, synth_cpu, recorded = 0.0, 0.0, 0.0  # ``recorded``: the dataset's seconds at the last point
        for total, share in self.points(row):
            point_dir = self.point_dir(row, seed, total, share)
            point_file = point_dir / "point.json"
            if point_file.exists():
                point = json.loads(point_file.read_text())
                if abs(point.get("synthesis_share", share) - share) > 1e-9:  # e.g. a sweep re-chose the share
                    raise ValueError(f"{point_file} ran at synthesis share {point['synthesis_share']}, the file now "
                                     f"says {share}: rerun row {name!r} with --fresh --rows")
                synth_wall, synth_cpu = point["synthesis_wall_seconds"], point.get("synthesis_cpu_seconds")
                recorded = point.get("dataset_seconds", point.get("synthesis_seconds")) or 0.0
                continue
            point_dir.mkdir(parents=True, exist_ok=True)
            # A killed attempt at this point saved seconds that synth's budget counts: the point's synthesis took
            # them too, else distillation would get them on top of the total (its CPU seconds are then unknown).
            killed = max(0.0, (continued_seconds(dataset, config, method, options) or 0.0) - recorded)
            made = run_command(synth("run", method, "--out", str(dataset), "--teacher", str(self.teacher),
                                     "--config", str(config), "--preset", self.preset, "--num-images", "10000000",
                                     "--shard-size", str(self.budget["shard_size"]),
                                     "--time-budget", f"{share * total:.1f}s", "--seed", str(seed), "--quiet"),
                               point_dir / "synth.log", lane)
            synth_wall += killed + made.wall_seconds
            synth_cpu = None if killed or synth_cpu is None else synth_cpu + (made.cpu_seconds or 0.0)
            manifest = json.loads((dataset / "manifest.json").read_text())
            recorded = shards.spent_seconds(manifest)
            student = point_dir / "student"
            if student.exists():
                shutil.rmtree(student)
            # Distillation gets what synthesis left of the total: synthesis stops only after the batch in which
            # its budget ran out (DeepInversion's batches take ~40 s on one core) and its process start-up is not
            # in its budget, so a fixed (1 - share) x T let whole rows run 5-7% over (the first sweep's points).
            distill_budget = max(total - synth_wall, MIN_DISTILL_SHARE * (1 - share) * total)
            trained = run_command(distill("run", "--shards", str(dataset), "--out", str(student),
                                          "--student", self.spec["student"], "--eval-data", self.spec["eval_data"],
                                          "--epochs", str(self.budget["distill_max_epochs"]),
                                          "--batch-size", str(self.budget["distill_batch_size"]),
                                          "--time-budget", f"{distill_budget:.1f}s", "--budget-covers", "training",
                                          "--eval-every", "1000000", "--seed", str(seed), "--quiet"),
                                  point_dir / "distill.log", lane)
            metrics = json.loads((student / "metrics.json").read_text())
            distill_wall = trained.wall_seconds - (metrics.get("eval_seconds") or 0.0)  # evaluation not charged
            summary = manifest.get("summary", {})
            point = {
                "row": name, "seed": seed, "total_budget_seconds": total, "synthesis_share": share,
                "synthesis_budget_seconds": share * total, "distill_budget_seconds": distill_budget,
                "images": manifest["num_samples"],
                "synthesis_wall_seconds": synth_wall, "synthesis_cpu_seconds": synth_cpu,
                "synthesis_seconds": summary.get("synthesis_seconds"), "dataset_seconds": recorded,
                "continued_from_seconds": killed,
                "synthesis_images_per_second": manifest["num_samples"] / synth_wall,
                "distill_wall_seconds": distill_wall, "distill_cpu_seconds": trained.cpu_seconds,
                "distill_epochs": metrics["epochs"], "distill_images_per_second": metrics.get("images_per_second"),
                "distill_train_seconds": metrics.get("train_seconds"),
                "distill_train_share": metrics.get("train_seconds", 0) / max(distill_wall, 1e-9),
                "distill_eval_seconds": metrics.get("eval_seconds"),
                "total_wall_seconds": synth_wall + distill_wall,
                "over_budget": tables.over_budget(synth_wall + distill_wall, total),
                "threads": lane.threads, "cores": list(trained.cores),
                "precision": {"synthesis": manifest.get("method", {}).get("precision"),
                              "distill": metrics.get("precision")},
                "accuracy": metrics["final_accuracy"], "ratio": metrics["final_accuracy"] / self.teacher_acc,
                "teacher_agreement": summary.get("teacher_agreement"),
                "worst_class_agreement": worst_class(summary.get("per_class_agreement")),
                "pairwise_separability": (summary.get("diversity") or {}).get("pairwise_separability"),
                "student_per_class_accuracy": metrics.get("per_class_accuracy"),
            }
            write_json_atomic(point_file, point, indent=2)
            print(f"   {name} (seed {seed}) @ {format_duration(total)}, share {share:.0%}: {point['images']} images, "
                  f"accuracy {point['accuracy']:.2%}, wall {point['total_wall_seconds']:.0f} s "
                  f"({point['over_budget']:+.1%} of budget)", flush=True)

    def units(self, only: set[str] | None) -> list[tuple[dict[str, Any], int]]:
        check_row_names(only, self.rows)
        rows = [row for row in self.rows if not only or row["name"] in only]
        for row in rows:
            self.shares(row)  # refuses a row without a share before anything runs
        return [(row, seed) for row in rows for seed in self.seeds(row)]

    def run(self, only: set[str] | None) -> None:
        units = self.units(only)
        self.out.mkdir(parents=True, exist_ok=True)
        self.teacher = resolve_teacher(self.pipeline, self.out, self.plan.whole())
        self.teacher_acc = teacher_accuracy(self.teacher, self.spec["eval_data"])
        run_in_lanes(units, self._unit, self.plan, key=lambda unit: (unit[0]["name"], unit[1]))
        self.write()

    def _unit(self, unit: tuple[dict[str, Any], int], lane: Lane) -> None:
        row, seed = unit
        print(f"== {row['name']} (seed {seed}), lane {lane.index}", flush=True)
        try:
            self.row(row, seed, lane)
        finally:
            with self._lock:
                self.write()

    # -- what it will take, and what it found -------------------------------------------------------------------

    def remaining_seconds(self, only: set[str] | None = None) -> float:
        """Estimated wall time of the points not yet on disk: budgets plus each point's start-ups and evaluation,
        the runs dealt out to the lanes in order (each lane takes the next run when it is free)."""
        durations = []
        for row, seed in self.units(only):
            seconds, synthesised = 0.0, 0.0
            for total, share in self.points(row):
                if not (self.point_dir(row, seed, total, share) / "point.json").exists():
                    seconds += share * total - synthesised + (1 - share) * total + POINT_OVERHEAD_SECONDS
                synthesised = share * total
            durations.append(seconds)
        lanes = [0.0] * self.plan.lanes
        for seconds in durations:
            heapq.heappush(lanes, heapq.heappop(lanes) + seconds)
        return max(lanes)

    def finished_points(self) -> dict[str, list[dict[str, Any]]]:
        """Every row's finished points on disk, in pipeline order (a sweep: one entry per row and share)."""
        found = {}
        for row in (row for row in self.rows if self.has_share(row)):
            for share in sorted(set(self.shares(row))):
                files = [self.point_dir(row, seed, total, s) / "point.json"
                         for seed in self.seeds(row) for total, s in self.points(row) if s == share]
                points = [{"row": row["name"], "synthesis_share": share, **json.loads(f.read_text())}
                          for f in files if f.exists()]
                if points:
                    found[self.display_name(row, share)] = points
        return found

    def write(self) -> None:
        env = environment(self.plan)
        results = self.finished_points()
        chosen = tables.chosen_shares(results) if self.sweep else None
        payload = {"benchmark": self.spec, "budget": self.budget, "environment": env, "teacher": str(self.teacher),
                   "teacher_accuracy": self.teacher_acc, "rows": results,
                   **({"chosen_shares": chosen} if chosen is not None else {})}
        write_results(self.out, payload, tables.walltime_tables(self.spec, self.budget, self.teacher_acc, results,
                                                                env, chosen))
        tables.plot_curves(results, self.teacher_acc, self.out / "accuracy_vs_walltime.png",
                           f"{env['device']}, {self.plan.lanes} x {self.plan.threads_per_lane} thread(s)")


def run_file(pipeline: dict[str, Any], fresh: bool, only: set[str] | None, plan: bool, source: str) -> None:
    share_from = pipeline["budget"].get("share_from")
    if plan and share_from and not Path(share_from).exists():  # the estimate does not depend on the shares
        print(f"{source}: {share_from} does not exist yet (run the split sweep first); estimating all the same")
        pipeline = {**pipeline, "budget": {**pipeline["budget"], "share_from": "", "synthesis_share": 0.75}}
    benchmark = WallTimeBenchmark(pipeline, fresh, source=source)
    if plan:
        seconds = benchmark.remaining_seconds(only)
        print(f"{source}: {benchmark.plan.describe()}; {len(benchmark.units(only))} runs; about "
              f"{seconds / 3600:.1f} h of wall time left ({POINT_OVERHEAD_SECONDS:.0f} s per point over its budget)")
        return
    benchmark.run(only)
    print((benchmark.out / "results.md").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", type=Path, help="pipeline file, e.g. pipelines/fmnist32_cpu_decisive.toml")
    parser.add_argument("--rows", default=None, help="row names to run, separated by semicolons [default: all]")
    parser.add_argument("--fresh", action="store_true", help="recompute points even if their results are on disk")
    parser.add_argument("--plan", action="store_true", help="print lanes and the wall time left, run nothing")
    add_lane_arguments(parser)
    args = parser.parse_args(argv)
    pipeline = apply_lane_arguments(tomllib.loads(args.pipeline.read_text()), args)
    try:
        with children_stopped_on_termination():
            run_file(pipeline, args.fresh, {n.strip() for n in args.rows.split(";")} if args.rows else None,
                     args.plan, str(args.pipeline))
    except OversubscribedError as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()

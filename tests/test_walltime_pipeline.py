"""The equal-wall-time benchmark's bookkeeping (pipelines/walltime.py, pipelines/tables.py): seeds per row, where
each run's points live, what a point records, the tables' spread, ranks and marks, and the split sweep. The runs
themselves are the benchmark's job, not the tests': the commands are replaced by fakes that write what the real
ones would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines import walltime
from pipelines.lanes import Lane
from pipelines.runs import RunTime, write_row_config
from pipelines.tables import OVERRUN_NOTE, chosen_shares, verdict, walltime_tables
from pipelines.walltime import WallTimeBenchmark

PIPELINE = {
    "benchmark": {"name": "t", "student": "resnet8", "eval_data": "none", "out": "", "teacher": "t.pt",
                  "seeds": [0]},
    "budget": {"totals": ["1m"], "synthesis_share": 0.75, "shard_size": 8, "lanes": 1, "distill_max_epochs": 200,
               "distill_batch_size": 64},
    "rows": [{"name": "a", "method": "gmi", "seeds": [0, 1, 2]}, {"name": "b c", "method": "fast"}],
}
ENV = {"device": "CPU", "torch": "x", "cpu_threads": 1, "lanes": 2, "plan": "2 lane(s) x 1 thread(s)"}


def _pipeline(tmp_path: Path, **budget) -> dict:
    spec = json.loads(json.dumps(PIPELINE))
    spec["benchmark"]["out"] = str(tmp_path)
    spec["budget"].update(budget)
    return spec


def _point(seed: int, accuracy: float, total_wall: float = 60.0, share: float = 0.75, row: str = "a") -> dict:
    return {"row": row, "seed": seed, "total_budget_seconds": 60.0, "synthesis_share": share, "images": 64 * (seed + 1),
            "synthesis_wall_seconds": total_wall * share, "synthesis_cpu_seconds": total_wall * share * 0.9,
            "synthesis_images_per_second": 1.0, "distill_wall_seconds": total_wall * (1 - share),
            "distill_cpu_seconds": total_wall * (1 - share), "distill_epochs": 3, "distill_images_per_second": 100.0,
            "distill_train_share": 0.9, "total_wall_seconds": total_wall, "accuracy": accuracy, "ratio": accuracy / 0.9,
            "teacher_agreement": 0.5, "worst_class_agreement": 0.1}


def _row(table: str, name: str) -> str:
    return next(line for line in table.splitlines() if f"| {name} |" in line and line.startswith("| "))


def test_every_seed_of_a_row_has_its_own_folder_and_the_table_gives_their_spread(tmp_path):
    spec = _pipeline(tmp_path)
    bench = WallTimeBenchmark(spec, fresh=False, cores=2)
    assert bench.seeds(spec["rows"][0]) == [0, 1, 2] and bench.seeds(spec["rows"][1]) == [0]
    assert bench.row_dir(spec["rows"][0], 2) == tmp_path / "a" / "seed-2"
    for seed, accuracy in ((0, 0.50), (1, 0.60), (2, 0.55)):
        point = bench.row_dir(spec["rows"][0], seed) / "total-1m00s" / "point.json"
        point.parent.mkdir(parents=True)
        point.write_text(json.dumps(_point(seed, accuracy)))
    found = bench.finished_points()
    assert list(found) == ["a"] and [p["seed"] for p in found["a"]] == [0, 1, 2]
    table = walltime_tables(spec["benchmark"], spec["budget"], 0.9, found, ENV)
    row = _row(table, "a")
    assert row.startswith("| 1 | a |")  # ranked, three seeds: no mark
    assert "| 128 |" in row  # images: the mean over the seeds
    assert "55.00% ± 5.00 (50.00–60.00%, n=3)" in row
    assert "‡" not in row
    assert "| a | 2 | 1m00s | 75% | 192 | 60 |" in table  # every seed listed


def test_a_ranked_row_with_fewer_than_three_seeds_is_marked(tmp_path):
    found = {"a": [_point(s, 0.5 + s / 100) for s in range(3)], "b c": [_point(0, 0.7, row="b c")]}
    table = walltime_tables(PIPELINE["benchmark"], PIPELINE["budget"], 0.9, found, ENV)
    assert _row(table, "b c").startswith("| 1 ‡ | b c |")  # best mean, but one seed: ranked and marked
    assert "70.00% (n=1) ‡" in _row(table, "b c")
    assert _row(table, "a").startswith("| 2 | a |")
    assert "fewer than 3 seeds" in table


def test_a_row_over_its_budget_is_marked_and_not_ranked(tmp_path):
    # "b c" is the most accurate, but one seed took 66 s of a 60 s budget (+10%): it had more time than "a"
    found = {"a": [_point(s, 0.5) for s in range(3)],
             "b c": [_point(0, 0.8, row="b c"), _point(1, 0.8, 66.0, row="b c"), _point(2, 0.8, row="b c")]}
    table = walltime_tables(PIPELINE["benchmark"], PIPELINE["budget"], 0.9, found, ENV)
    assert _row(table, "a").startswith("| 1 | a |")
    over = _row(table, "b c")
    assert over.startswith("| – (over budget +10%) | b c |") and "**+10.0%**" in over
    assert OVERRUN_NOTE in table
    assert "| b c | 1 | 1m00s | 75% | 128 | 66 | **+10.0%** over budget |" in table
    # 4% over is within the tolerance: ranked
    found["b c"][1] = _point(1, 0.8, 62.4, row="b c")
    assert _row(walltime_tables(PIPELINE["benchmark"], PIPELINE["budget"], 0.9, found, ENV), "b c").startswith("| 1 |")


def test_a_point_records_cpu_seconds_and_its_budget_beside_wall_seconds(tmp_path, monkeypatch):
    spec = _pipeline(tmp_path)
    spec["rows"] = [{"name": "a", "method": "gmi"}]
    bench = WallTimeBenchmark(spec, fresh=False, cores=2)
    bench.teacher, bench.teacher_acc = Path("t.pt"), 0.9
    calls = []

    def fake_run(command: list[str], log: Path, lane: Lane | None = None) -> RunTime:
        calls.append((command, lane))
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if "synth" in command[:3]:
            (out / "manifest.json").write_text(json.dumps({"num_samples": 64, "summary": {"teacher_agreement": 0.5},
                                                               "method": {"precision": "bf16"}}))
            return RunTime(47.0, 40.0, (1,))
        (out / "metrics.json").write_text(json.dumps({"epochs": 2, "final_accuracy": 0.6, "train_seconds": 10.0,
                                                      "eval_seconds": 5.0, "images_per_second": 50.0,
                                                      "precision": "fp32"}))
        return RunTime(20.0, 19.0, (1,))

    monkeypatch.setattr(walltime, "run_command", fake_run)
    lane = Lane(1, (1,), 1)
    bench.row(spec["rows"][0], 0, lane)
    point = json.loads((tmp_path / "a" / "seed-0" / "total-1m00s" / "point.json").read_text())
    assert point["synthesis_wall_seconds"] == 47.0 and point["synthesis_cpu_seconds"] == 40.0
    assert point["distill_wall_seconds"] == 15.0 and point["distill_cpu_seconds"] == 19.0  # evaluation not charged
    # distillation gets what synthesis left of the minute (60 - 47 s), not the nominal 15 s: totals stay equal
    assert point["synthesis_budget_seconds"] == 45.0 and point["distill_budget_seconds"] == pytest.approx(13.0)
    assert point["over_budget"] == pytest.approx(62 / 60 - 1) and point["cores"] == [1] and point["threads"] == 1
    assert point["precision"] == {"synthesis": "bf16", "distill": "fp32"}  # what each stage's default resolved to
    assert all(used is lane for _, used in calls)
    synth_command = calls[0][0]
    assert synth_command[1:4] == ["-m", "synth", "run"]  # the public command, not an internal module
    assert synth_command[synth_command.index("--time-budget") + 1] == "45.0s"
    distill_command = calls[1][0]
    assert distill_command[distill_command.index("--time-budget") + 1] == "13.0s"
    calls.clear()
    bench.row(spec["rows"][0], 0, lane)  # finished points are reused
    assert calls == []
    redefined = {**spec["rows"][0], "options": {"inversion_steps": 5}}  # ... nor for a row redefined under its name
    with pytest.raises(ValueError, match="row 'a': .* ran with other options"):
        bench.row(redefined, 0, lane)
    assert calls == [] and "inversion_steps" not in (tmp_path / "a" / "seed-0" / "synth.toml").read_text()
    spec["rows"][0]["synthesis_share"] = 0.5  # ... nor at another share than they ran at
    with pytest.raises(ValueError, match="ran at synthesis share 0.75"):
        WallTimeBenchmark(spec, fresh=False, cores=2).row(spec["rows"][0], 0, lane)



def _killed_attempt(run: Path, options: dict) -> None:
    """What a synthesis killed after 30 s of saved shards leaves in a walltime run's folder."""
    (run / "dataset").mkdir(parents=True)
    write_row_config(run / "synth.toml", "gmi", options)
    (run / "dataset" / "manifest.json").write_text(json.dumps({"num_samples": 40,
                                                               "summary": {"synthesis_seconds": 30.0}}))


def test_a_point_killed_half_way_counts_the_seconds_its_dataset_already_holds(tmp_path, monkeypatch):
    # synth's budget counts a killed attempt's saved seconds, so the continued synthesis runs only the rest of its
    # share: the point must count them too, or distillation gets them on top of the total.
    spec = _pipeline(tmp_path, totals=["1m", "2m"])
    spec["rows"] = [{"name": "a", "method": "gmi"}]
    bench = WallTimeBenchmark(spec, fresh=False, cores=2)
    bench.teacher, bench.teacher_acc = Path("t.pt"), 0.9

    def fake_run(command: list[str], log: Path, lane: Lane | None = None) -> RunTime:
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if "synth" in command[:3]:
            held = json.loads((out / "manifest.json").read_text())["summary"]["synthesis_seconds"] \
                if (out / "manifest.json").exists() else 0.0
            (out / "manifest.json").write_text(json.dumps({"num_samples": 64, "complete": True,
                                                           "summary": {"synthesis_seconds": held + 14.0}}))
            return RunTime(16.0, 15.0, (1,))
        (out / "metrics.json").write_text(json.dumps({"epochs": 2, "final_accuracy": 0.6, "eval_seconds": 0.0}))
        return RunTime(10.0, 9.0, (1,))

    monkeypatch.setattr(walltime, "run_command", fake_run)
    run = tmp_path / "a" / "seed-0"
    _killed_attempt(run, {})  # 30 s of shards saved
    bench.row(spec["rows"][0], 0, Lane(1, (1,), 1))
    point = json.loads((run / "total-1m00s" / "point.json").read_text())
    assert point["continued_from_seconds"] == 30.0 and point["synthesis_wall_seconds"] == 46.0  # 30 saved + 16 now
    assert point["synthesis_cpu_seconds"] is None  # the killed attempt's are unknown
    assert point["distill_budget_seconds"] == pytest.approx(14.0) and point["dataset_seconds"] == 44.0
    later = json.loads((run / "total-2m00s" / "point.json").read_text())  # continues the 1-minute point's dataset
    assert later["continued_from_seconds"] == 0.0 and later["synthesis_wall_seconds"] == 62.0
    table = walltime_tables(spec["benchmark"], spec["budget"], 0.9, bench.finished_points(), ENV)
    assert "| a | 0 (continued after a kill) | 1m00s |" in table and "| a | 0 | 2m00s |" in table
    # a killed attempt made with other options is started again, not continued and not counted
    shutil.rmtree(run)
    _killed_attempt(run, {"inversion_steps": 5})  # 30 s of shards saved
    bench.row(spec["rows"][0], 0, Lane(1, (1,), 1))
    point = json.loads((run / "total-1m00s" / "point.json").read_text())
    assert point["continued_from_seconds"] == 0.0 and point["synthesis_wall_seconds"] == 16.0
    assert point["dataset_seconds"] == 14.0 and point["synthesis_cpu_seconds"] == 15.0


def test_the_table_says_which_rows_are_ahead_of_the_baselines_by_more_than_the_seed_spread():
    means = {"gmi": [0.50, 0.52, 0.54], "far": [0.60, 0.61, 0.62], "near": [0.53, 0.55, 0.50],
             "worse": [0.40, 0.41, 0.42], "long": [0.70, 0.71, 0.72]}
    results = {name: [_point(seed, acc, row=name) for seed, acc in enumerate(values)]
               for name, values in means.items()}
    results["long"][0]["total_wall_seconds"] = 70.0  # over budget: had more time, gets no verdict
    spec = {**PIPELINE["benchmark"], "baselines": ["gmi", "absent"]}
    table = walltime_tables(spec, PIPELINE["budget"], 0.9, results, ENV)
    section = table.split("## Against the baselines at 1m00s")[1].split("## Every seed")[0]
    assert "| vs gmi |" in section and "vs absent" not in section and "3 seeds (mean ± sd, range)" in section
    assert _row(section, "far") == "| far | 75% | 64–192 | 61.00% ± 1.00 (60.00–62.00%) | +9.00 ahead | 50.0% |"
    assert "| -11.00 behind |" in _row(section, "worse") and "| +0.67 within |" in _row(section, "near")
    assert "| over budget |" in _row(section, "long") and "| – |" in _row(section, "gmi")
    assert verdict({"mean": 0.6, "std": 0.0, "n": 1}, {"mean": 0.5, "std": 0.0, "n": 3}) == "one seed: undecided"
    assert "Against the baselines" not in walltime_tables(PIPELINE["benchmark"], PIPELINE["budget"], 0.9, results, ENV)

def test_a_split_sweep_continues_one_dataset_and_names_the_best_share_within_budget(tmp_path):
    spec = _pipeline(tmp_path, synthesis_shares=[0.8, 0.5, 0.65])
    del spec["budget"]["synthesis_share"]
    spec["rows"] = [{"name": "a", "method": "gmi", "seeds": [0, 1]}]
    bench = WallTimeBenchmark(spec, fresh=False, cores=2)
    row = spec["rows"][0]
    assert bench.points(row) == [(60.0, 0.5), (60.0, 0.65), (60.0, 0.8)]  # smallest synthesis first
    assert bench.point_dir(row, 1, 60.0, 0.65) == tmp_path / "a" / "seed-1" / "total-1m00s-share-65"
    accuracy = {0.5: 0.50, 0.65: 0.56, 0.8: 0.60}
    for seed in (0, 1):
        for share, acc in accuracy.items():
            path = bench.point_dir(row, seed, 60.0, share) / "point.json"
            path.parent.mkdir(parents=True)
            wall = 70.0 if share == 0.8 and seed == 1 else 60.0  # the 80% point ran over budget in one seed
            path.write_text(json.dumps(_point(seed, acc + seed / 100, wall, share)))
    found = bench.finished_points()
    assert list(found) == ["a @ 50%", "a @ 65%", "a @ 80%"]
    assert chosen_shares(found) == {"a": 0.65}  # 80% is more accurate, but over budget
    table = walltime_tables(spec["benchmark"], spec["budget"], 0.9, found, ENV, {"a": 0.65})
    share_line = table.split("## Synthesis share chosen per method")[1].split("## Every seed")[0]
    choice = next(line for line in share_line.splitlines() if line.startswith("| a |"))
    assert choice.endswith("| 65% |") and "(over budget)" in choice
    bench.teacher, bench.teacher_acc = Path("t.pt"), 0.9
    bench.write()
    assert json.loads((tmp_path / "results.json").read_text())["chosen_shares"] == {"a": 0.65}
    # a later file fixes the share from the sweep's results, and refuses a row the sweep did not choose for
    fixed = _pipeline(tmp_path / "fixed", share_from=str(tmp_path / "results.json"))
    del fixed["budget"]["synthesis_share"]
    fixed["rows"] = [{"name": "a", "method": "gmi"}]
    assert WallTimeBenchmark(fixed, fresh=False, cores=2).shares(fixed["rows"][0]) == [0.65]
    fixed["rows"].append({"name": "new", "method": "fast"})
    later = WallTimeBenchmark(fixed, fresh=False, cores=2)  # the other rows run while the sweep has not chosen
    assert [row["name"] for row, _ in later.units({"a"})] == ["a"]
    assert list(later.finished_points()) == []
    with pytest.raises(ValueError, match="chose no share for row 'new'"):
        later.units(None)
    with pytest.raises(ValueError, match="chose no share for row 'new'"):
        later.run({"new"})  # refused before the teacher is looked for
    with pytest.raises(ValueError, match="no row named 'ne w'"):
        later.units({"a", "ne w"})  # a typo in --rows would otherwise run nothing, silently


def test_the_plan_estimates_the_wall_time_left(tmp_path):
    spec = _pipeline(tmp_path, lanes=2, threads_per_lane=1, totals=["10m"])
    spec["rows"] = [{"name": n, "method": "gmi", "seeds": [0, 1, 2]} for n in ("a", "b")]
    bench = WallTimeBenchmark(spec, fresh=False, cores=2)
    per_run = 600 + walltime.POINT_OVERHEAD_SECONDS
    assert bench.remaining_seconds() == pytest.approx(3 * per_run)  # six runs on two lanes
    done = bench.point_dir(spec["rows"][0], 0, 600.0, 0.75) / "point.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    assert bench.remaining_seconds() == pytest.approx(3 * per_run)  # 5 left: still three rounds on one lane
    assert bench.remaining_seconds({"a"}) == pytest.approx(per_run)


def test_a_pipeline_with_one_seed_keeps_the_old_layout(tmp_path):
    spec = json.loads(json.dumps(PIPELINE))
    spec["benchmark"] = {**spec["benchmark"], "out": str(tmp_path), "seed": 3}
    del spec["benchmark"]["seeds"]
    del spec["rows"][0]["seeds"]
    bench = WallTimeBenchmark(spec, fresh=False, cores=2)
    assert bench.seeds(spec["rows"][0]) == [3]
    assert bench.row_dir(spec["rows"][0], 3) == tmp_path / "a"


def test_share_outside_zero_and_one_is_refused():
    spec = json.loads(json.dumps(PIPELINE))
    spec["budget"]["synthesis_share"] = 1.0
    with pytest.raises(ValueError, match="synthesis_share"):
        WallTimeBenchmark(spec, fresh=False, cores=2)


def test_the_results_figure_draws_the_references_once_then_the_rows_asked_for_from_each_file(tmp_path):
    from pipelines.results_plot import parse_source, pick_rows

    def results(path: Path, rows: list[str]) -> Path:
        acc = {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 3}
        names = ["teacher", "KD on real images", *rows]
        path.write_text(json.dumps({"rows": {name: {"name": f"{name} ({path.stem})", "accuracy": acc}
                                             for name in names}}))
        return path

    first = results(tmp_path / "a.json", ["gmi, fp32", "gmi, bf16"])
    second = results(tmp_path / "b.json", ["kgen", "cmi"])
    assert parse_source(f"{second}:kgen; cmi") == (second, ("kgen", "cmi"))
    assert parse_source(str(first)) == (first, ())
    picked, references = pick_rows([parse_source(str(first)), parse_source(f"{second}:cmi")])
    assert [row["name"] for row in picked] == ["teacher (a)", "KD on real images (a)", "gmi, fp32 (a)",
                                               "gmi, bf16 (a)", "cmi (b)"]
    assert references == 2
    with pytest.raises(SystemExit, match="has no row 'fast'"):
        pick_rows([parse_source(f"{second}:fast")])


def test_the_figure_of_a_one_budget_table_is_one_line_per_row_and_of_several_budgets_a_curve(tmp_path, monkeypatch):
    from pipelines import results_plot, tables

    drawn = []
    monkeypatch.setattr(tables, "plot_one_budget", lambda results, *args: drawn.append(("rows", list(results))))
    one = {"a": [_point(s, 0.5 + s / 100) for s in range(3)], "b c": [_point(0, 0.6, row="b c")]}
    tables.plot_curves(one, 0.9, tmp_path / "one.png", "CPU")
    assert drawn == [("rows", ["a", "b c"])] and not (tmp_path / "one.png").exists()
    saved = tmp_path / "results.json"  # the README's figure is drawn again from a committed results file
    saved.write_text(json.dumps({"rows": one, "teacher_accuracy": 0.9, "environment": ENV}))
    results_plot.plot([results_plot.parse_source(f"{saved}:b c")], tmp_path / "readme.png")
    assert drawn[-1] == ("rows", ["b c"])
    monkeypatch.undo()
    tables.plot_curves(one, 0.9, tmp_path / "one.png", "CPU")  # the real one-budget figure, hollow when over
    one["a"][0]["total_wall_seconds"] = 70.0
    tables.plot_curves(one, 0.9, tmp_path / "over.png", "CPU")
    two = {"a": [*one["a"], {**_point(0, 0.7), "total_budget_seconds": 120.0, "total_wall_seconds": 121.0}]}
    tables.plot_curves(two, 0.9, tmp_path / "two.png", "CPU")
    for name in ("one", "over", "two"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_figure_merges_the_tables_of_two_budgets_into_one_curve_per_row(tmp_path, monkeypatch):
    from pipelines import results_plot, tables

    drawn = []
    monkeypatch.setattr(tables, "plot_curves", lambda results, teacher, *args: drawn.append((results, teacher)))
    ten = {"a": [_point(s, 0.5) for s in range(3)], "b": [_point(0, 0.6, row="b")]}
    twenty = {"a": [{**_point(s, 0.7), "total_budget_seconds": 120.0} for s in range(3)]}
    first, second = tmp_path / "10m.json", tmp_path / "20m.json"
    first.write_text(json.dumps({"rows": ten, "teacher_accuracy": 0.9, "environment": ENV}))
    second.write_text(json.dumps({"rows": twenty, "teacher_accuracy": 0.9, "environment": ENV}))
    results_plot.plot([results_plot.parse_source(str(first)), results_plot.parse_source(str(second))],
                      tmp_path / "both.png")
    results, teacher = drawn[-1]
    assert teacher == 0.9 and sorted(results) == ["a", "b"]
    assert sorted(p["total_budget_seconds"] for p in results["a"]) == [60.0] * 3 + [120.0] * 3
    both = [results_plot.parse_source(str(first)), results_plot.parse_source(str(second))]
    for changed in ({"teacher_accuracy": 0.8}, {"environment": {**ENV, "device": "another CPU"}}):
        second.write_text(json.dumps({"rows": twenty, "teacher_accuracy": 0.9, "environment": ENV, **changed}))
        with pytest.raises(SystemExit, match="differ in teacher"):  # a curve across teachers or machines
            results_plot.plot(both, tmp_path / "both.png")
    second.write_text(json.dumps({"rows": ten, "teacher_accuracy": 0.9, "environment": ENV}))
    with pytest.raises(SystemExit, match="same seed and budget"):  # the same runs twice would count double
        results_plot.plot(both, tmp_path / "both.png")

"""Benchmark runs never outnumber cores (pipelines/lanes.py, pipelines/runs.py): over-subscribed files are refused,
no committed pipeline file over-subscribes the 2-core machine, each lane's runs are pinned to its own core with
its threads, and every run's CPU seconds are measured. Children here are tiny Python processes, not synthesis."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from pipelines import benchmark as benchmark_module
from pipelines import runs
from pipelines.benchmark import Benchmark
from pipelines.lanes import Lane, LanePlan, OversubscribedError, plan_lanes, run_in_lanes
from pipelines.walltime import WallTimeBenchmark

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILES = sorted((ROOT / "pipelines").rglob("*.toml"))


def test_a_file_with_more_threads_than_cores_is_refused_with_the_numbers():
    with pytest.raises(OversubscribedError, match=r"8 lanes x 1 thread\(s\) per lane = 8 threads.* 2 core"):
        plan_lanes({"lanes": 8}, cores=2)
    with pytest.raises(OversubscribedError, match=r"1 lanes x 4 thread\(s\) per lane = 4 threads"):
        plan_lanes({"lanes": 1, "threads_per_lane": 4}, cores=2)
    assert plan_lanes({"lanes": 2, "threads_per_lane": 1}, cores=2).lanes == 2
    assert plan_lanes({}, cores=2).threads_per_lane == 2  # one lane gets every core


@pytest.mark.parametrize("runner", ["equal images", "equal wall time"])
def test_both_runners_refuse_an_over_subscribed_file_before_running_anything(tmp_path, runner):
    spec = {"name": "t", "student": "resnet8", "eval_data": "none", "out": str(tmp_path / "out"), "teacher": "t.pt"}
    budget = {"lanes": 8, "num_images": 8, "shard_size": 8, "distill_epochs": 1, "distill_batch_size": 8}
    if runner == "equal wall time":
        budget.update(totals=["1m"], synthesis_share=0.75)
    pipeline = {"benchmark": spec, "budget": budget, "rows": [{"name": "a", "method": "gmi"}]}
    cls = Benchmark if runner == "equal images" else WallTimeBenchmark
    with pytest.raises(OversubscribedError, match="8 threads"):
        cls(pipeline, fresh=False, cores=2, source="x.toml")
    assert not (tmp_path / "out").exists()


def test_no_committed_pipeline_file_over_subscribes_the_two_core_machine():
    assert len(PIPELINE_FILES) >= 12  # the test would pass vacuously if the files moved
    for path in PIPELINE_FILES:
        budget = tomllib.loads(path.read_text()).get("budget", {})
        plan = plan_lanes(budget, cores=2, source=str(path))  # raises for an over-subscribed file
        assert plan.lanes * plan.threads_per_lane <= 2, path


def test_each_lane_pins_its_runs_to_its_own_core_and_sizes_their_threads(tmp_path, monkeypatch):
    pinned: list[tuple[int, set[int]]] = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pinned.append((pid, set(cores))), raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the lane's count must win over the runner's own environment
    plan = LanePlan(lanes=2, threads_per_lane=1, cores=(0, 1))
    seen: dict[int, runs.RunTime] = {}

    def work(item: int, lane: Lane) -> None:
        log = tmp_path / f"{item}.log"
        seen[item] = runs.run_command([sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"],
                                      log, lane)
        assert log.read_text().splitlines()[-1] == "1"  # the child has the lane's thread count

    run_in_lanes(range(4), work, plan)
    assert len(pinned) == 4 and len({pid for pid, _ in pinned}) == 4  # every child pinned, by its own pid
    assert {frozenset(cores) for _, cores in pinned} == {frozenset({0}), frozenset({1})}  # one core per lane
    assert {seen[i].cores for i in range(4)} <= {(0,), (1,)}
    assert {seen[i].threads for i in range(4)} == {1}  # recorded with the run, for the table's later sittings


def test_a_run_records_the_cpu_seconds_of_its_child_and_grandchildren(tmp_path):
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    spawn = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {busy!r}])"
    spent = runs.run_command([sys.executable, "-c", spawn], tmp_path / "log", None)
    assert spent.cpu_seconds is not None and spent.cpu_seconds >= 0.3  # the grandchild's busy loop counts
    assert spent.wall_seconds >= 0.3 and spent.cores == ()
    idle = runs.run_command([sys.executable, "-c", "pass"], tmp_path / "log", None)
    assert idle.cpu_seconds is not None and idle.cpu_seconds < 0.2  # this child's alone: not the runner's, not
    # the earlier children's (two lanes' children finish side by side, and each run has its own figure)
    with pytest.raises(RuntimeError, match="command failed"):
        runs.run_command([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log", None)


def test_a_terminated_benchmark_stops_its_commands_instead_of_leaving_them_orphaned(tmp_path):
    """``kill PID`` or ``timeout`` on a benchmark kills the commands it runs (as Ctrl-C does), so that a re-run does
    not find their dataset folders locked by orphans still running."""
    import signal
    import subprocess
    import textwrap

    pid_file = tmp_path / "child.pid"
    script = tmp_path / "bench.py"
    script.write_text(textwrap.dedent(f"""
        import sys, threading
        from pathlib import Path
        from pipelines import runs
        child = [sys.executable, "-c", "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                 "time.sleep(120)"]
        with runs.children_stopped_on_termination():
            lane = threading.Thread(target=runs.run_command, args=(child, Path({str(tmp_path / 'c.log')!r})),
                                    daemon=True)
            lane.start()
            lane.join()
    """))
    bench = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_a_run_waits_for_the_runs_it_reads_and_every_run_happens_when_one_fails():
    plan = LanePlan(lanes=2, threads_per_lane=1, cores=(0, 1))
    finished: list[str] = []
    lock = threading.Lock()

    def work(item: str, lane: Lane) -> None:
        if item == "source":
            time.sleep(0.2)  # the dependent row is picked up by the other lane meanwhile
        if item == "broken":
            raise ValueError("broken")
        with lock:
            finished.append(item)

    needs = {"ablation": ["source"], "after broken": ["broken"]}
    with pytest.raises(ValueError, match="broken"):
        run_in_lanes(["source", "ablation", "broken", "after broken", "other"], work, plan,
                     needs=lambda item: needs.get(item, []))
    assert finished.index("source") < finished.index("ablation") and "other" in finished
    assert "after broken" not in finished
    with pytest.raises(ValueError, match="must come before it"):
        run_in_lanes(["ablation", "source"], work, plan, needs=lambda item: needs.get(item, []))


def test_a_free_lane_takes_a_later_run_that_can_start_rather_than_wait():
    # Row-major order: seed 2's ablation waits for seed 2's hours-long stage 1, so the other lane must run seed
    # 3's ablation meanwhile, not sit idle behind the waiting one.
    plan = LanePlan(lanes=2, threads_per_lane=1, cores=(0, 1))
    other_started = threading.Event()
    order: list[str] = []

    def work(item: str, lane: Lane) -> None:
        order.append(item)
        if item == "other":
            other_started.set()
        if item == "stage 1":  # finishes only once the independent run has started beside it
            assert other_started.wait(timeout=5), "the free lane waited instead of taking the run it could start"

    run_in_lanes(["stage 1", "ablation", "other"], work, plan,
                 needs=lambda item: ["stage 1"] if item == "ablation" else [])
    assert order.index("ablation") > order.index("other")


def test_equal_image_runs_are_one_per_row_and_seed_and_ablations_wait_for_their_stage_1(tmp_path):
    pipeline = tomllib.loads((ROOT / "pipelines" / "fmnist28_paper_miniature.toml").read_text())
    pipeline["benchmark"]["out"] = str(tmp_path)
    bench = Benchmark(pipeline, fresh=False, cores=2)
    units = bench.units(None)
    assert [bench.key(u) for u in units[:2]] == [("student on real labels", None), ("KD on real images", None)]
    ablation = next(u for u in units if u[0].get("prior_from") and u[1] == 2)
    assert bench.needs(ablation) == [(ablation[0]["prior_from"], 2)]
    assert bench.preset == "paper" and pipeline["teacher"]["arch"]


def test_the_decisive_table_runs_exactly_the_rows_its_split_sweep_chose_shares_for():
    def rows(name: str) -> list[tuple]:
        pipeline = tomllib.loads((ROOT / "pipelines" / name).read_text())
        return [(r["name"], r["method"], sorted(r.get("options", {}).items())) for r in pipeline["rows"]
                if "synthesis_share" not in r]  # a row with its own share needs no sweep

    decisive = tomllib.loads((ROOT / "pipelines" / "fmnist32_cpu_decisive.toml").read_text())
    sweep = tomllib.loads((ROOT / "pipelines" / "fmnist32_cpu_split_sweep.toml").read_text())
    assert rows("fmnist32_cpu_decisive.toml") == rows("fmnist32_cpu_split_sweep.toml")
    assert decisive["budget"]["totals"] == sweep["budget"]["totals"] == ["10m"]
    assert Path(decisive["budget"]["share_from"]).name == f"{sweep['benchmark']['name']}.json"
    assert len(decisive["benchmark"]["seeds"]) >= 3
    # the table measures on other seeds than the sweep chose its shares on: the choice does not flatter it
    assert not set(decisive["benchmark"]["seeds"]) & set(sweep["benchmark"]["seeds"])


def test_the_readme_shows_the_decisive_table_that_the_committed_results_give():
    from pipelines.tables import baseline_table

    saved = json.loads((ROOT / "pipelines" / "results" / "fmnist32-cpu-decisive.json").read_text())
    table = [line for line in baseline_table(saved["rows"], 600.0, saved["benchmark"]["baselines"])
             if line.startswith("| ")]
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(table) > 8 and [line for line in table if line not in readme] == []
    committed = (ROOT / "pipelines" / "results" / "fmnist32-cpu-decisive.md").read_text().splitlines()
    assert [line for line in table if line not in committed] == []  # the results file is the same table


def _commands_faked(monkeypatch, fake_run) -> None:
    """A benchmark whose commands are ``fake_run`` and whose teacher, its accuracy and the rows' options are given."""
    monkeypatch.setattr(benchmark_module, "run_command", fake_run)
    monkeypatch.setattr(benchmark_module, "resolve_teacher", lambda pipeline, out, lane: Path("t.pt"))
    monkeypatch.setattr(benchmark_module, "teacher_accuracy", lambda path, data: 0.9)
    monkeypatch.setattr(Benchmark, "row_options", lambda self, row, seed, lane: row.get("options", {}))
    monkeypatch.setattr(benchmark_module, "teacher_arch", lambda path: "resnet8")


def test_an_equal_image_benchmark_records_cpu_seconds_per_run_and_ranks_its_rows(tmp_path, monkeypatch, capsys):
    from pipelines import benchmark as bench_module

    order: list[tuple[str, str]] = []
    precisions: dict[str, set[str | None]] = {}
    lock = threading.Lock()

    def fake_run(command: list[str], log: Path, lane: Lane | None = None) -> runs.RunTime:
        out = Path(command[command.index("--out") + 1])
        precision = command[command.index("--precision") + 1] if "--precision" in command else None
        with lock:
            precisions.setdefault(out.parts[len(tmp_path.parts)], set()).add(precision)
        out.mkdir(parents=True, exist_ok=True)
        seed = command[command.index("--seed") + 1] if "--seed" in command else "0"
        if command[2] == "synth":
            assert ("--prior" in command) == ("w-o" in str(out))  # the ablation reads its seed's stage 1
            (out / "manifest.json").write_text(json.dumps({"complete": True, "num_samples": 8, "summary": {},
                                                           "shards": [{"bytes": 800}]}))
            with lock:
                order.append((out.parent.parent.name, seed))
            return runs.RunTime(10.0, 9.0, lane.cores, threads=lane.threads)
        (out / "metrics.json").write_text(json.dumps({"final_accuracy": 0.5 + int(seed) / 100}))
        return runs.RunTime(4.0, 3.5, lane.cores, threads=lane.threads)

    _commands_faked(monkeypatch, fake_run)
    monkeypatch.setattr(runs, "code_commit", lambda: "abc")
    pipeline = {"benchmark": {"name": "t", "student": "resnet8", "eval_data": "e", "real_data": "e",
                              "out": str(tmp_path), "seeds": [0, 1, 2]},
                "budget": {"num_images": 8, "shard_size": 8, "distill_epochs": 1, "distill_batch_size": 8,
                           "lanes": 2, "threads_per_lane": 1},
                "rows": [{"name": "d2cip", "method": "d2cip"},
                         {"name": "w/o scr", "method": "d2cip", "prior_from": "d2cip", "options": {"scr": False}},
                         {"name": "one seed", "method": "gmi", "seeds": [0], "precision": "bf16"}]}
    bench = bench_module.Benchmark(pipeline, fresh=False, cores=2)
    bench.run(None)
    assert precisions["one-seed"] == {"bf16"} and precisions["d2cip"] == {None}  # both stages, that row only
    for seed in "012":
        assert order.index(("d2cip", seed)) < order.index(("w-o-scr", seed))
    results = json.loads((tmp_path / "results.json").read_text())["rows"]
    run = results["d2cip"]["runs"][0]
    assert run["synthesis_cpu_seconds"] == 9.0 and run["distill_cpu_seconds"] == 3.5 and run["threads"] == 1
    assert run["synthesis_cores"] in ([0], [1])
    assert run["commit"] == "abc"  # which code made it
    monkeypatch.setattr(runs, "code_commit", lambda: "def")
    capsys.readouterr()
    one_lane = {**pipeline, "budget": {**pipeline["budget"], "lanes": 1, "threads_per_lane": 2}}
    bench_module.Benchmark(one_lane, fresh=False, cores=2).run({"d2cip"})  # reused runs, made by other code
    assert "reused from a run made by abc, not this tree (def)" in capsys.readouterr().out
    reused = json.loads((tmp_path / "results.json").read_text())["rows"]["d2cip"]["runs"][0]
    assert reused["threads"] == 1  # the threads it ran with, not this sitting's two
    table = (tmp_path / "results.md").read_text()
    assert "1 lane(s) x 2 thread(s)" in table and "ran with 1 thread(s) each" in table
    assert "| 1 | d2cip | 51.00% ± 1.00 (50.00–52.00%, n=3) |" in table
    assert "| 3 ‡ | one seed | 50.00% (n=1) ‡ |" in table and "fewer than 3 seeds" in table
    assert "| ref. | resnet8: student on real labels (8 real images) |" in table
    redefined = json.loads(json.dumps(pipeline))
    redefined["rows"][0]["options"] = {"scr_weight": 2.0}  # a row redefined under its old name is not reused
    with pytest.raises(ValueError, match="row 'd2cip': .* ran with other options"):
        bench_module.Benchmark(redefined, fresh=False, cores=2).run({"d2cip"})
    order.clear()  # a later sitting with --rows runs only that row, and still writes the whole file's table
    bench_module.Benchmark(pipeline, fresh=True, cores=2).run({"one seed"})
    assert order == [("one-seed", "0")]
    assert "| 1 | d2cip | 51.00% ± 1.00 (50.00–52.00%, n=3) |" in (tmp_path / "results.md").read_text()


def test_a_killed_synthesis_is_continued_with_its_saved_seconds_unless_its_options_changed(tmp_path, monkeypatch):
    """D2CIP's paper-preset stage 1 takes hours on a CPU: a benchmark killed during it continues the dataset (synth
    resumes stage 1 from its checkpoint), and the row's synthesis seconds are the saved ones plus the new attempt's."""
    from pipelines import benchmark as bench_module

    found: dict[str, bool] = {}

    def fake_run(command: list[str], log: Path, lane: Lane | None = None) -> runs.RunTime:
        out = Path(command[command.index("--out") + 1])
        if command[2] == "synth":
            found[out.parent.parent.name] = (out / "manifest.json").exists()
            out.mkdir(parents=True, exist_ok=True)
            (out / "manifest.json").write_text(json.dumps({"complete": True, "num_samples": 8, "summary": {},
                                                           "shards": [{"bytes": 800}]}))
            return runs.RunTime(10.0, 9.0, lane.cores)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"final_accuracy": 0.5}))
        return runs.RunTime(4.0, 3.5, lane.cores)

    _commands_faked(monkeypatch, fake_run)
    # What two killed attempts left: 40 s of shards and 110 s of stage-1 checkpoints; the second row's was made
    # with options the row no longer has.
    for name, options in (("killed", {"cgmm": True}), ("changed", {"cgmm": False})):
        run = tmp_path / name / "seed-0"
        (run / "dataset").mkdir(parents=True)
        (run / "dataset" / "manifest.json").write_text(json.dumps({
            "complete": False, "summary": {"synthesis_seconds": 40.0},
            "prepare_state": {"url": "resume/prepare-000003.pt", "seconds": 110.0}}))
        runs.write_row_config(run / "synth.toml", "d2cip", options)
    pipeline = {"benchmark": {"name": "t", "student": "resnet8", "eval_data": "e", "real_data": "e",
                              "out": str(tmp_path), "seeds": [0]},
                "budget": {"num_images": 8, "shard_size": 8, "distill_epochs": 1, "distill_batch_size": 8,
                           "lanes": 1, "threads_per_lane": 1},
                "rows": [{"name": "killed", "method": "d2cip", "options": {"cgmm": True}},
                         {"name": "changed", "method": "d2cip", "options": {"cgmm": True}}]}
    bench_module.Benchmark(pipeline, fresh=False, cores=2).run({"killed", "changed"})
    assert found == {"killed": True, "changed": False}  # continued; started again
    results = json.loads((tmp_path / "results.json").read_text())["rows"]
    continued, again = results["killed"]["runs"][0], results["changed"]["runs"][0]
    assert continued["synthesis_seconds"] == 160.0 and continued["synthesis_cpu_seconds"] is None
    assert continued["synthesis_continued_from_seconds"] == 150.0
    assert again["synthesis_seconds"] == 10.0 and again["synthesis_cpu_seconds"] == 9.0
    assert "| killed (continued after a kill) |" in (tmp_path / "results.md").read_text()


def test_a_teacher_table_trains_the_teacher_once_with_distill_train(tmp_path, monkeypatch):
    commands: list[list[str]] = []

    def fake_run(command: list[str], log: Path, lane: Lane | None = None) -> runs.RunTime:
        commands.append(command)
        out = Path(command[command.index("--out") + 1])
        (out / "model.pt").write_bytes(b"")
        (out / "metrics.json").write_text("{}")
        return runs.RunTime(1.0, 1.0, ())

    monkeypatch.setattr(runs, "run_command", fake_run)
    pipeline = {"benchmark": {"out": str(tmp_path)}, "teacher": {"data": "fmnist", "arch": "resnet8", "epochs": 10}}
    lane = LanePlan(2, 1, (0, 1)).whole()
    assert lane.cores == (0, 1) and lane.threads == 2  # trained alone, before the lanes, on every core
    assert runs.resolve_teacher(pipeline, tmp_path, lane) == tmp_path / "teacher" / "model.pt"
    assert commands[0][1:4] == ["-m", "distill", "train"]
    assert commands[0][4:10] == ["--data", "fmnist", "--arch", "resnet8", "--epochs", "10"]
    assert runs.resolve_teacher(pipeline, tmp_path, lane) == tmp_path / "teacher" / "model.pt"
    assert len(commands) == 1  # reused
    with pytest.raises(ValueError, match="not both"):
        runs.resolve_teacher({**pipeline, "benchmark": {"teacher": "t.pt"}}, tmp_path, lane)


def test_the_budgets_precision_reaches_every_command_the_real_data_references_too(tmp_path, monkeypatch):
    """A file at ``[budget] precision = "fp32"`` compares fp32 rows with fp32 references, whatever ``auto`` means on
    the machine (the references of issue 20's re-run ran at the default, bf16, before this)."""
    spec = {"name": "t", "student": "resnet8", "eval_data": "none", "real_data": "fmnist32",
            "out": str(tmp_path / "out"), "teacher": "t.pt"}
    budget = {"lanes": 1, "num_images": 8, "shard_size": 8, "distill_epochs": 1, "distill_batch_size": 8,
              "precision": "fp32"}
    bench = Benchmark({"benchmark": spec, "budget": budget, "rows": [{"name": "a", "method": "gmi"}]},
                      fresh=False, cores=2, source="x.toml")
    bench.teacher = tmp_path / "t.pt"
    commands: list[list[str]] = []

    def fake_run(command, log, lane):
        commands.append(command)
        out = Path(command[command.index("--out") + 1])
        (out / "metrics.json").write_text(json.dumps({"final_accuracy": 0.5}))

    monkeypatch.setattr(benchmark_module, "run_command", fake_run)
    for name in benchmark_module.REFERENCES:
        bench.reference_run(name, None)
    assert len(commands) == 2 and all(c[c.index("--precision") + 1] == "fp32" for c in commands), commands
    assert bench.precision_args({"precision": "bf16"}) == ["--precision", "bf16"]  # a row's own wins


def test_a_results_file_says_whether_its_cpu_ran_bf16_or_fp32(monkeypatch):
    """Sittings of one file on CPUs with and without a bf16 fast path make very different images/s: the machine
    line every table and figure prints must tell them apart."""
    import torch

    import zoo.device
    from pipelines.runs import environment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = plan_lanes({"lanes": 2, "threads_per_lane": 1}, cores=2)
    monkeypatch.setattr(zoo.device, "cpu_has_bf16", lambda: True)
    assert environment(plan)["device"] == "CPU, 2 cores, bf16 fast path"
    monkeypatch.setattr(zoo.device, "cpu_has_bf16", lambda: False)
    assert environment(plan)["device"] == "CPU, 2 cores, no bf16 fast path: fp32"

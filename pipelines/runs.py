"""What both benchmark runners (equal images: ``benchmark.py``; equal wall time: ``walltime.py``) do around the
two public commands: start them in a lane (threads sized, process pinned), time them in wall and CPU seconds,
train a teacher when the pipeline asks for one, and read the figures every table shows.

The commands run as ``python -m synth`` / ``python -m distill``, exactly as a user runs them, so the benchmark
measures the product and not an internal entry point.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import shards
from atomicio import write_atomic, write_json_atomic

from .lanes import Lane, LanePlan


@dataclass(frozen=True)
class RunTime:
    """One finished command: wall seconds, CPU seconds of it and every process it waited for (rusage; None
    where the OS cannot say), the cores it was pinned to (empty: not pinned) and the threads it ran with (the
    lane's; a reused run keeps its own, not the later sitting's). ``continued_from``: the seconds a killed earlier
    attempt had saved in the dataset this one continued (counted in ``wall_seconds``)."""

    wall_seconds: float
    cpu_seconds: float | None
    cores: tuple[int, ...] = ()
    continued_from: float = 0.0
    threads: int | None = None

    def record(self) -> dict[str, Any]:
        record = {"seconds": self.wall_seconds, "cpu_seconds": self.cpu_seconds, "cores": list(self.cores),
                  "threads": self.threads}
        return {**record, "continued_from_seconds": self.continued_from} if self.continued_from else record

    def after(self, earlier: float | None) -> RunTime:
        """This attempt as the continuation of one that saved ``earlier`` seconds (whose CPU seconds are unknown)."""
        return replace(self, wall_seconds=self.wall_seconds + earlier, cpu_seconds=None,
                       continued_from=earlier) if earlier else self


def pin(pid: int, cores: tuple[int, ...]) -> tuple[int, ...]:
    """Pins process ``pid`` to ``cores`` where the OS allows; returns the cores it was pinned to (or ())."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return ()
    try:
        os.sched_setaffinity(pid, set(cores))
    except OSError:  # it already exited, or a core outside this container's set: run unpinned, and say so
        return ()
    return tuple(cores)


_CHILDREN: set[subprocess.Popen] = set()  # the commands running now, in every lane


@contextlib.contextmanager
def children_stopped_on_termination() -> Iterator[None]:
    """While the body runs, SIGTERM (``kill PID``, ``timeout``) kills the commands this process started and then
    exits, as Ctrl-C does: otherwise they would run on, orphaned, and a re-run would find their folders locked."""
    def stop(signum: int, frame: Any) -> None:
        for process in list(_CHILDREN):
            process.kill()  # synth and distill survive a kill: the re-run continues their work
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(command: list[str], log: Path, lane: Lane | None = None) -> RunTime:
    """Runs a CLI command in ``lane`` (its threads, pinned to its cores), output to ``log``; raises with the
    log's tail on failure.

    The child is pinned from here right after it starts: Python's start-up takes tens of milliseconds before
    torch could start a thread, and every thread and process it starts later inherits the affinity
    (``preexec_fn`` would pin it earlier, but is unsafe with the lanes' threads). CPU seconds come from
    ``wait4`` on this child alone, so two lanes' children are never summed together.
    """
    env = {**os.environ, **lane.env()} if lane is not None else None
    started = time.perf_counter()
    with log.open("w") as handle:
        handle.write(" ".join(command) + "\n")
        handle.flush()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _CHILDREN.add(process)
        cores = pin(process.pid, lane.cores) if lane is not None else ()
        cpu: float | None = None
        try:
            if hasattr(os, "wait4"):
                _, status, usage = os.wait4(process.pid, 0)
                process.returncode = os.waitstatus_to_exitcode(status)
                cpu = usage.ru_utime + usage.ru_stime
            else:
                process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            _CHILDREN.discard(process)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"command failed ({process.returncode}): {' '.join(command)}\n{tail}")
    return RunTime(wall, cpu, cores, threads=lane.threads if lane is not None else None)


def code_commit() -> str | None:
    """The commit this tree is at (``+dirty`` when tracked files differ from it); None outside a git checkout.
    Recorded with every run, because a benchmark reuses finished runs: a table must say which code made them."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_is_busy(max_load: float, force: bool) -> bool:
    """True (and says why on stderr) when the one-minute load average is over ``max_load`` and ``force`` is not
    set: a speed measurement on a busy machine measures the other processes."""
    load = os.getloadavg()[0]
    if load > max_load and not force:
        print(f"load average {load:.2f} > {max_load}: the machine is busy, so the figures would measure the "
              "other processes; not measuring (--force to measure anyway)", file=sys.stderr)
        return True
    return False


def read_time(path: Path) -> RunTime:
    """A :class:`RunTime` written by :meth:`RunTime.record` (older files hold wall seconds only; files without
    threads held one thread per pinned core, as every lane does)."""
    saved = json.loads(path.read_text())
    cores = tuple(saved.get("cores", ()))
    return RunTime(saved["seconds"], saved.get("cpu_seconds"), cores, saved.get("continued_from_seconds", 0.0),
                   saved.get("threads") or len(cores) or None)


def write_results_file(path: Path, spent: RunTime) -> None:
    write_json_atomic(path, {**spent.record(), "commit": code_commit()})


def reused_commit(path: Path, name: str, seed: int) -> str | None:
    """The commit that made a run (read back from its timing file), with a note when a reused run was made
    by other code than this tree's: the committed 512-image table once mixed such runs unnoticed."""
    made = json.loads(path.read_text()).get("commit")
    now = code_commit()
    if made != now:
        print(f"   note: {name} (seed {seed}) reused from a run made by {made or 'an unrecorded commit'}, "
              f"not this tree ({now}); --fresh re-runs it", flush=True)
    return made


def continued_seconds(dataset: Path, config: Path, method: str, options: dict[str, Any]) -> float | None:
    """The synthesis seconds that a killed attempt saved in ``dataset`` (its shards', and its set-up's progress:
    D2CIP's stage 1 checkpoints), when the next attempt continues it: made with the options the row asks for now
    (its ``synth.toml``). None: nothing to continue, and the folder is started again."""
    manifest_path = dataset / "manifest.json"
    if not manifest_path.exists() or not config.exists() or config.read_text() != row_config_text(method, options):
        return None
    return shards.spent_seconds(json.loads(manifest_path.read_text())) or None


def synth(*args: str) -> list[str]:
    return [sys.executable, "-m", "synth", *args]


def distill(*args: str) -> list[str]:
    return [sys.executable, "-m", "distill", *args]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def check_row_names(only: set[str] | None, rows: list[dict[str, Any]]) -> None:
    """Refuses ``--rows`` naming a row the file does not have: a typo would otherwise run nothing, silently."""
    unknown = sorted(set(only or ()) - {row["name"] for row in rows})
    if unknown:
        raise ValueError(f"no row named {', '.join(map(repr, unknown))}; the file's rows: "
                         + "; ".join(row["name"] for row in rows))


def worst_class(per_class: list[float | None] | None) -> float | None:
    """The lowest per-class teacher agreement (a class the method fails to make shows here, not in the mean)."""
    values = [v for v in per_class or [] if v is not None]
    return min(values) if values else None


def train_share(metrics: dict[str, Any]) -> float | None:
    """Of distillation's wall time, the share spent training (the rest: start-up, data, evaluation)."""
    train, wall = metrics.get("train_seconds"), metrics.get("wall_seconds")
    return train / wall if train is not None and wall else None


def _toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def row_config_text(method: str, options: dict[str, Any]) -> str:
    """The row's method options as the ``[synth.METHOD]`` table ``synth run --config`` reads."""
    lines = [f"[synth.{method}]"] + [f"{key} = {_toml_value(value)}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def write_row_config(path: Path, method: str, options: dict[str, Any]) -> None:
    write_atomic(path, row_config_text(method, options))


def check_reused_options(path: Path, method: str, options: dict[str, Any], row: str) -> None:
    """Refuses to reuse a finished run whose ``synth.toml`` (written when it ran) holds other options than the
    row now asks for: a row redefined under its old name would otherwise report the old run's figures."""
    if path.exists() and path.read_text() != row_config_text(method, options):
        raise ValueError(f"row {row!r}: {path.parent} ran with other options ({path} differs from the file's "
                         f"row); rerun it with --fresh --rows {row!r}, or move that folder aside")


def teacher_accuracy(teacher_path: Path, eval_data: str) -> float:
    import torch

    import realdata
    import zoo

    teacher = zoo.load_classifier(teacher_path).eval()
    test = realdata.load(eval_data, split="test")
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test.labels), 1000):
            x = torch.from_numpy(test.images[start:start + 1000]).permute(0, 3, 1, 2).float() / 255
            correct += int((teacher(x).argmax(1).numpy() == test.labels[start:start + 1000]).sum())
    return correct / len(test.labels)


def teacher_arch(teacher_path: Path) -> str:
    import zoo

    return zoo.load_classifier(teacher_path).card.arch


def resolve_teacher(pipeline: dict[str, Any], out: Path, lane: Lane | None) -> Path:
    """The pipeline's teacher: ``[benchmark] teacher`` (empty: the shipped WRN-16-2), or the one ``[teacher]``
    asks ``distill train`` for (trained once into ``<out>/teacher``, resumed from its checkpoint if killed,
    reused when finished). ``[teacher]`` maps to ``distill train`` options: ``data`` and ``arch`` required,
    e.g. ``epochs = 10``, ``batch_size = 128``."""
    spec, table = pipeline["benchmark"], pipeline.get("teacher")
    if table is None:
        if spec.get("teacher"):
            return Path(spec["teacher"])
        import zoo

        return zoo.default_teacher_path()
    if spec.get("teacher"):
        raise ValueError("give [benchmark] teacher (a checkpoint) or a [teacher] table to train one, not both")
    if "data" not in table or "arch" not in table:
        raise ValueError("[teacher] needs data and arch (the `distill train` options), e.g. data = \"fmnist\"")
    directory = out / "teacher"
    if not (directory / "metrics.json").exists():
        resume = (directory / "last.pt").exists()
        if directory.exists() and not resume:
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        options = [arg for name, value in table.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
        epochs = str(table.get("epochs", 100))
        print(f"== teacher: distill train {' '.join(options)}", flush=True)
        run_command(distill("train", *options, "--out", str(directory), "--eval-every", epochs, "--quiet",
                            *(["--resume"] if resume else [])), out / "teacher.log", lane)
    return directory / "model.pt"


def write_results(out: Path, payload: dict[str, Any], table: str) -> None:
    write_json_atomic(out / "results.json", payload, indent=2)
    write_atomic(out / "results.md", table)


def environment(plan: LanePlan) -> dict[str, Any]:
    """The machine the figures come from and how runs shared it, for the tables' header."""
    import platform

    import torch

    from zoo.device import cpu_has_bf16

    cuda = torch.cuda.is_available()
    # Whether the CPU has a bf16 fast path decides what the default precision runs (and so the images/s): two
    # sittings of one file on different CPUs must not be read as one machine.
    cpu = f"CPU, {len(plan.cores)} cores, " + ("bf16 fast path" if cpu_has_bf16() else "no bf16 fast path: fp32")
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": cuda,
            "device": torch.cuda.get_device_name() if cuda else cpu,
            "lanes": plan.lanes, "cpu_threads": plan.threads_per_lane, "plan": plan.describe()}

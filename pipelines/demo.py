"""README command 1, measured: the demo's two commands over seeds, on a quiet machine or with one core held busy.

    python -m pipelines.demo --method kgen [--seeds 0 1 2] [--busy-core] [--synth-budget 6m]
                             [--distill-budget 3m] [--precision bf16] [--extra "SYNTH OPTIONS"] [--label NAME]
                             [--json pipelines/results/demo.json]

Each seed runs exactly what the README runs, ``synth run METHOD --out DIR --time-budget 6m`` then
``distill run --shards DIR --time-budget 3m``, plus ``--seed`` on both (seed 0 is the README's own run) and
``--out`` into a folder of its own. It records the student's accuracy, the images made, the epochs fitted, and the
wall time of the pair. ``--busy-core`` holds the machine's last core with a busy loop (a Python process spinning,
pinned there) for the whole pair: what issue 23 calls a busy machine. A quiet measurement refuses to start while
the one-minute load average is over ``--max-load``: it would measure the other processes.

Results are appended to the JSON under ``--label`` (default: the method, precision and load), and the summary
table (mean ± standard deviation and range over seeds) is printed and written beside it as ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from atomicio import write_atomic, write_json_atomic

from .runs import machine_is_busy


def _busy_loop() -> subprocess.Popen | None:
    """A process spinning on the last core (pinned where the OS allows); None on a 1-core machine."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cores) < 2:
        return None
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(process.pid, {cores[-1]})
    return process


def run_pair(method: str, seed: int, out: Path, synth_budget: str, distill_budget: str,
             extra: list[str], precision: str | None, busy: bool) -> dict[str, Any]:
    """One demo pair; returns its figures."""
    dataset, student = out / "dataset", out / "student"
    commands = [
        [sys.executable, "-m", "synth", "run", method, "--out", str(dataset), "--time-budget", synth_budget,
         "--seed", str(seed), "--quiet", *extra],
        [sys.executable, "-m", "distill", "run", "--shards", str(dataset), "--time-budget", distill_budget,
         "--seed", str(seed), "--out", str(student), "--quiet"],
    ]
    if precision:  # one switch for both stages
        commands = [command + ["--precision", precision] for command in commands]
    spinner = _busy_loop() if busy else None
    load = os.getloadavg()[0]
    started = time.perf_counter()
    seconds = []
    try:
        for command in commands:
            begun = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            seconds.append(time.perf_counter() - begun)
            if done.returncode != 0:
                raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    manifest = json.loads((dataset / "manifest.json").read_text())
    metrics = json.loads((student / "metrics.json").read_text())
    return {"seed": seed, "accuracy": 100 * metrics["final_accuracy"],
            "teacher_accuracy": 100 * metrics["teacher_accuracy"],
            "images": manifest["num_samples"], "epochs": metrics["epochs"], "precision": metrics.get("precision"),
            "synth_seconds": seconds[0], "distill_seconds": seconds[1],
            "wall_seconds": time.perf_counter() - started, "load_at_start": load, "busy_core": busy,
            "objective": metrics.get("objective", {}).get("name"),
            "commands": [shlex.join(c[2:]) for c in commands]}


def summary(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| demo | student accuracy, mean ± sd (range, n) | of the teacher | images | epochs | wall time |",
             "|---|---|---|---|---|---|"]
    for label, runs in results.items():
        acc = [r["accuracy"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        teacher = runs[0]["teacher_accuracy"]
        lines.append(
            f"| {label} | {statistics.mean(acc):.2f}% ± {sd:.2f} ({min(acc):.2f}–{max(acc):.2f}%, n={len(acc)}) | "
            f"{statistics.mean(acc) / teacher:.3f} | {min(r['images'] for r in runs):,}–"
            f"{max(r['images'] for r in runs):,} | {min(r['epochs'] for r in runs)}–{max(r['epochs'] for r in runs)} | "
            f"{max(r['wall_seconds'] for r in runs) / 60:.1f} min at most |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="d2cip")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--synth-budget", default="6m")
    parser.add_argument("--distill-budget", default="3m")
    parser.add_argument("--extra", default="", help="more synth run options, e.g. \"--class-embedding centre\"")
    parser.add_argument("--precision", default=None, help="--precision for both commands (default: theirs)")
    parser.add_argument("--busy-core", action="store_true", help="hold the last core with a busy loop")
    parser.add_argument("--label", default=None)
    parser.add_argument("--out", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--json", type=Path, default=Path("pipelines/results/demo.json"))
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--force", action="store_true", help="measure even on a busy machine")
    args = parser.parse_args(argv)
    if machine_is_busy(args.max_load, args.force):
        return 2
    extra = shlex.split(args.extra)
    named = " ".join(filter(None, [args.method, args.extra, args.precision and f"--precision {args.precision}"]))
    label = args.label or named + (", one core busy" if args.busy_core else ", quiet")
    results: dict[str, list[dict[str, Any]]] = json.loads(args.json.read_text()) if args.json.exists() else {}
    for seed in args.seeds:
        out = args.out / f"{label.replace(' ', '_').replace(',', '')}-seed{seed}"
        if out.exists():
            raise SystemExit(f"{out} exists: remove it or pick another --out")
        figures = run_pair(args.method, seed, out, args.synth_budget, args.distill_budget, extra, args.precision,
                           args.busy_core)
        print(f"{label} seed {seed}: {figures['accuracy']:.2f}% ({figures['images']:,} images, "
              f"{figures['epochs']} epochs, {figures['wall_seconds'] / 60:.1f} min)", flush=True)
        runs = [r for r in results.get(label, []) if r["seed"] != seed] + [figures]
        results[label] = sorted(runs, key=lambda r: r["seed"])
        write_json_atomic(args.json, results)
    table = summary(results)
    write_atomic(args.json.with_suffix(".md"), (table + "\n").encode())
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

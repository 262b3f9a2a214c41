"""Synthesis speed, measured side by side: this tree against an earlier commit, and where a step's time goes.

    python -m pipelines.speed compare [--baseline REV] [--methods d2cip,gmi] [--num-images 256] [--rounds 2]
    python -m pipelines.speed profile [--method d2cip] [--steps 10] [--fuse-views on|off]
    python -m pipelines.speed state
    python -m pipelines.speed precision [--methods gmi,d2cip] [--rounds 2] ...   (pipelines/precision_speed.py)
    python -m pipelines.speed compile [--precision bf16] ...                      (pipelines/compile_speed.py)

``compare`` checks out ``REV`` (default: the last commit before the inversion core v2) into a temporary git
worktree and runs the same ``synth run`` command in both trees, alternating (baseline, current, baseline,
current, ...) so that load on a shared machine falls on both sides alike; it prints the images/s of every
run (the manifest's figure: the synthesis loop, without D2CIP's stage 1, on both sides) with the whole
process's wall seconds beside it, and the ratio of the medians. Both sides get the
same explicit options (the CPU budget of that commit), so the configs are equal by construction.

``profile`` runs stage-2 batches of a method on the shipped teacher under ``torch.profiler`` and prints the
time inside each named scope of the inversion core (``synth.generate``, ``synth.teacher``,
``synth.proxy_student``, ``synth.losses``, ``synth.update`` - the backward passes and optimiser steps -, and
``synth.proxy_kd``), per step, with the bound the teacher sets.

``state`` measures the resume state written with every shard of ``synth run gmi`` (CPU budget, one 64-image
batch done): its size and the time to serialise, check and write it, as stored now (the replay memory's
rows, uint8) and as the previous version stored it (the memory bank's whole preallocated float32 buffer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: The last landed commit before the inversion core v2.
DEFAULT_BASELINE = "7405505"
#: The CPU budget of that commit, given explicitly to both sides.
REFERENCE_OPTIONS = {
    "d2cip": ["--batch-size", "64", "--inversion-steps", "20", "--kd-steps", "5", "--prior-iterations", "100"],
    "gmi": ["--batch-size", "64", "--inversion-steps", "20", "--kd-steps", "5"],
    "deepinversion": ["--batch-size", "64", "--iterations", "60"],
}


def _synth_run(tree: Path, method: str, out: Path, num_images: int) -> float:
    command = [sys.executable, "-m", "synth", "run", method, "--out", str(out), "--preset", "paper",
               "--num-images", str(num_images), "--shard-size", str(num_images), "--device", "cpu", "--quiet",
               *REFERENCE_OPTIONS[method]]
    result = subprocess.run(command, cwd=tree, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tree)})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed in {tree}:\n{result.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return float(manifest["summary"]["synthesis_images_per_second"])


def compare(baseline: str, methods: list[str], num_images: int, rounds: int) -> dict[str, dict[str, object]]:
    here = Path(__file__).resolve().parents[1]
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
        old_tree = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(here), "worktree", "add", "--detach", str(old_tree), baseline], check=True,
                       capture_output=True)
        try:
            for method in methods:
                runs: dict[str, list[float]] = {"baseline": [], "current": []}
                for round_index in range(rounds):
                    for side, tree in (("baseline", old_tree), ("current", here)):
                        out = Path(tmp) / f"{method}-{side}-{round_index}"
                        started = time.perf_counter()
                        runs[side].append(_synth_run(tree, method, out, num_images))
                        print(f"{method:14s} {side:9s} round {round_index}: {runs[side][-1]:.2f} images/s "
                              f"({time.perf_counter() - started:.0f} s)", flush=True)
                ratio = statistics.median(runs["current"]) / statistics.median(runs["baseline"])
                results[method] = {**runs, "ratio": ratio}
                print(f"{method:14s} current/baseline = {ratio:.2f}x", flush=True)
        finally:
            subprocess.run(["git", "-C", str(here), "worktree", "remove", "--force", str(old_tree)], check=False,
                           capture_output=True)
    return results


SCOPES = ("synth.generate", "synth.teacher", "synth.proxy_student", "synth.losses", "synth.update",
          "synth.proxy_kd")


def profile(method_name: str, steps: int, batch_size: int, fuse_views: bool | None = None) -> dict[str, float]:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import zoo
    from synth.core.registry import get_method

    torch.manual_seed(0)
    teacher = zoo.load_classifier(zoo.default_teacher_path())
    method_class = get_method(method_name)
    values = {**method_class.config_class.own_cpu_budget(), "inversion_steps": steps, "batch_size": batch_size}
    if "prior_iterations" in values:
        values["prior_iterations"] = 2  # stage 1 is not what this measures
    device = torch.device("cpu")
    method = method_class(teacher, method_class.config_class(**values), device,
                          acceleration=zoo.Acceleration(device, enabled=True))
    if fuse_views is not None:  # same losses and gradients either way (tests/test_d2cip.py); only the time differs
        method.fuse_teacher_views = fuse_views

    class NoArtifacts:
        def path(self, name: str) -> None:
            return None

        def save(self, name: str, write: object) -> None:
            return None

    method.prepare(NoArtifacts())
    stream = method.synthesize()
    next(stream)  # the first batch runs without the proxy student; profile a later one
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        next(stream)
        wall = time.perf_counter() - started
    totals = {event.key: event.cpu_time_total / 1e6 for event in prof.key_averages() if event.key in SCOPES}
    per_step = {scope: totals.get(scope, 0.0) / steps for scope in SCOPES if scope != "synth.proxy_kd"}
    per_step["synth.proxy_kd (per batch)"] = totals.get("synth.proxy_kd", 0.0)
    per_step["wall per step, without proxy KD"] = (wall - totals.get("synth.proxy_kd", 0.0)) / steps

    # The floor the teacher sets: every view forward once, and backward once per view that a backward pass
    # traverses (all views in the first pass; the first view again in each further pass of a method that runs
    # its views as separate forwards).
    x = torch.rand(batch_size, *teacher.input_shape, requires_grad=True)
    teacher = teacher.eval().requires_grad_(False)
    forward = _best_of(lambda: teacher(x), 5)
    both = _best_of(lambda: torch.autograd.grad(teacher(x).sum(), x), 5)
    views = method.teacher_view_count()
    passes = method.engine.passes_run / (steps * 2)  # two batches ran: the first, unprofiled, and this one
    backward_views = views + (passes - 1) * (1 if not method.fuse_teacher_views else views)
    floor = views * forward + backward_views * (both - forward)
    per_step["teacher forward, one view (batch)"] = forward
    per_step["teacher forward+backward, one view (batch)"] = both
    per_step[f"teacher floor per step ({views} views, {passes:g} backward passes)"] = floor
    per_step["measured step / teacher floor"] = per_step["wall per step, without proxy KD"] / floor
    return per_step


def _best_of(fn: object, repeats: int) -> float:
    fn()  # type: ignore[operator]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - started)
    return best


def resume_state_cost() -> dict[str, dict[str, float]]:
    import torch

    import shards
    import zoo
    from synth.methods.gmi import GMI, GMIConfig

    torch.manual_seed(0)
    teacher = zoo.load_classifier(zoo.default_teacher_path())
    method = GMI(teacher, GMIConfig(**GMIConfig.cpu_budget), torch.device("cpu"))
    batch = next(method.synthesize())
    current = method.state_dict()
    previous = dict(current)
    buffer = torch.zeros(method.config.memory_capacity, *batch.images.shape[1:])  # the old float32 buffer
    buffer[: len(batch.images)] = batch.images
    previous["memory"] = {"capacity": method.config.memory_capacity, "rows": buffer[: len(batch.images)]}
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, state in (("previous", previous), ("current", current)):
            writer = shards.ShardWriter.open(Path(tmp) / name, identity={"x": name}, header={}, target_samples=10,
                                             shard_size=1)
            sample = shards.Sample("000000000", np.zeros((32, 32, 3), np.uint8), 0, np.zeros(10, np.float32))
            started = time.perf_counter()
            writer.commit_shard([sample], state={"method": state})
            seconds = time.perf_counter() - started
            size = (Path(tmp) / name / writer.manifest["resume_state"]).stat().st_size
            figures[name] = {"bytes": size, "seconds": seconds}
            print(f"{name:9s} resume state {size / 2**20:8.1f} MB, written in {seconds:.2f} s", flush=True)
    return figures


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["precision"]:  # fp32 against bf16: its own module, its own options
        from pipelines.precision_speed import main as precision_main

        sys.exit(precision_main(argv[1:]))
    if argv[:1] == ["compile"]:  # torch.compile on top of the precision
        from pipelines.compile_speed import main as compile_main

        sys.exit(compile_main(argv[1:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="images/s of this tree against an earlier commit, interleaved")
    cmp.add_argument("--baseline", default=DEFAULT_BASELINE)
    cmp.add_argument("--methods", default="d2cip,gmi")
    cmp.add_argument("--num-images", type=int, default=256)
    cmp.add_argument("--rounds", type=int, default=2)
    cmp.add_argument("--json", type=Path, default=None, help="also write the figures here")
    prof = sub.add_parser("profile", help="where one inversion step spends its time")
    prof.add_argument("--method", default="d2cip")
    prof.add_argument("--steps", type=int, default=10)
    prof.add_argument("--batch-size", type=int, default=64)
    prof.add_argument("--fuse-views", choices=("method", "on", "off"), default="method",
                      help="the teacher's views as one concatenated forward (on) or one forward each (off)")
    sub.add_parser("precision", help="synthesis and distill images/s, fp32 against bf16 (see its --help)")
    sub.add_parser("compile", help="torch.compile of the teacher on top of bf16 (see its --help)")
    sub.add_parser("state", help="size and write time of the resume state, now and as the previous version kept it")
    args = parser.parse_args(argv)
    if args.command == "compare":
        results = compare(args.baseline, args.methods.split(","), args.num_images, args.rounds)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    elif args.command == "state":
        resume_state_cost()
    else:
        fuse = {"method": None, "on": True, "off": False}[args.fuse_views]
        for scope, value in profile(args.method, args.steps, args.batch_size, fuse).items():
            shown = f"{value:8.2f}x" if scope.startswith("measured") else f"{value * 1000:8.1f} ms"
            print(f"{scope:58s} {shown}")


if __name__ == "__main__":
    main()

"""Synthesis and distillation images/s, fp32 against bf16, side by side in one run (issue 19).

    python -m pipelines.speed precision [--methods gmi,d2cip] [--num-images 128] [--rounds 2]
                                        [--distill-epochs 2] [--json PATH] [--force]

Per round and method, ``synth run METHOD --preset cpu --precision P --device cpu`` runs once at fp32 and once at
bf16, the order alternating between rounds, so that load on a shared machine falls on both sides alike; then
``distill run`` trains the default student from the round's fp32 gMI set at each precision. Figures: the
manifest's synthesis images/s (the loop, without set-up such as D2CIP's stage 1), ``distill run``'s
images/s, and each process's peak memory (RSS on a CPU). Printed as a table, with the ratio of the medians.

A measurement on a busy machine measures the other processes: it refuses to start when the one-minute load
average exceeds ``--max-load`` (1.5 by default; ``--force`` runs anyway and says so in the output).
K-Gen runs with ``--class-embedding centre`` (no text encoder needed); DiffDFKD needs ``--diffusion PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .runs import machine_is_busy

PRECISIONS = ("fp32", "bf16")
EXTRA = {"kgen": ["--class-embedding", "centre"], "kgen-s": ["--class-embedding", "centre"]}


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")


def synth(method: str, precision: str, out: Path, num_images: int, extra: list[str]) -> dict[str, float]:
    _run([sys.executable, "-m", "synth", "run", method, "--out", str(out), "--preset", "cpu", "--device", "cpu",
          "--num-images", str(num_images), "--shard-size", str(num_images), "--precision", precision, "--quiet",
          *EXTRA.get(method, []), *extra])
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    return {"images_per_second": float(summary["synthesis_images_per_second"]),
            "peak_memory_bytes": float(summary.get("peak_memory_bytes") or 0)}


def distill(shards: Path, precision: str, out: Path, epochs: int) -> dict[str, float]:
    _run([sys.executable, "-m", "distill", "run", "--shards", str(shards), "--out", str(out), "--epochs", str(epochs),
          "--eval-data", "none", "--device", "cpu", "--workers", "0", "--quiet", "--precision", precision])
    metrics = json.loads((out / "metrics.json").read_text())
    peak = metrics.get("peak_memory")
    return {"images_per_second": float(metrics["images_per_second"]),
            "peak_memory_bytes": float(peak.get("bytes", 0) if isinstance(peak, dict) else peak or 0)}


def measure(methods: list[str], num_images: int, rounds: int, distill_epochs: int,
            extra: dict[str, list[str]]) -> dict[str, dict[str, list[dict[str, float]]]]:
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        for r in range(rounds):
            order = PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]
            for method in methods:
                for precision in order:
                    out = Path(tmp) / f"{method}-{precision}-{r}"
                    figures = synth(method, precision, out, num_images, extra.get(method, []))
                    results.setdefault(method, {}).setdefault(precision, []).append(figures)
                    print(f"round {r} {method:14s} {precision}: {figures['images_per_second']:.2f} images/s, "
                          f"peak {figures['peak_memory_bytes'] / 2**20:.0f} MiB", flush=True)
            source = Path(tmp) / f"{methods[0]}-fp32-{r}"
            if distill_epochs:
                for precision in order:
                    figures = distill(source, precision, Path(tmp) / f"student-{precision}-{r}", distill_epochs)
                    results.setdefault("distill run", {}).setdefault(precision, []).append(figures)
                    print(f"round {r} {'distill run':14s} {precision}: {figures['images_per_second']:.1f} images/s",
                          flush=True)
    return results


def table(results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    lines = ["| run | fp32 images/s (rounds) | bf16 images/s (rounds) | bf16/fp32 (medians) | peak memory fp32 / "
             "bf16 |", "|---|---|---|---|---|"]
    for name, sides in results.items():
        speeds = {p: [f["images_per_second"] for f in sides.get(p, [])] for p in PRECISIONS}
        peaks = {p: max((f["peak_memory_bytes"] for f in sides.get(p, [])), default=0) / 2**20 for p in PRECISIONS}
        ratio = statistics.median(speeds["bf16"]) / statistics.median(speeds["fp32"]) if all(speeds.values()) else 0
        lines.append(f"| `{name}` | {' / '.join(f'{v:.2f}' for v in speeds['fp32'])} | "
                     f"{' / '.join(f'{v:.2f}' for v in speeds['bf16'])} | **{ratio:.2f}x** | "
                     f"{peaks['fp32']:.0f} / {peaks['bf16']:.0f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="gmi,d2cip", help="comma-separated; the first one's set is distilled")
    parser.add_argument("--num-images", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--distill-epochs", type=int, default=2, help="0: no distill figures")
    parser.add_argument("--diffusion", default=None, help="a diffusers pipeline, for diffdfkd")
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--force", action="store_true", help="measure even on a busy machine")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if machine_is_busy(args.max_load, args.force):
        return 2
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    extra: dict[str, list[str]] = {"diffdfkd": ["--diffusion", args.diffusion]} if args.diffusion else {}
    results = measure(args.methods.split(","), args.num_images, args.rounds, args.distill_epochs, extra)
    print(table(results))
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0

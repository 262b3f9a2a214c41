"""The README's results figure from benchmarks' results JSONs: accuracy per row with the seed range.

    python -m pipelines.results_plot docs/results-512.png \\
        pipelines/results/fmnist32-cpu-precision.json \\
        "pipelines/results/fmnist32-cpu-issue20-rerun.json:kgen;cpsc;cmi;deepinversion"

Each source is a results JSON, optionally followed by ``:`` and the rows to draw from it, separated by
semicolons, by their name in the JSON (default: every row). The references (teacher, the real-data rows) are
drawn first, once, from the first file that has them.

An equal-wall-time results JSON (``pipelines/walltime.py``: each row a list of points) is drawn as that runner
draws it (:func:`pipelines.tables.plot_curves`: one line per row at one budget, curves over several):

    python -m pipelines.results_plot docs/results-decisive.png pipelines/results/fmnist32-cpu-decisive.json

Several such files of one teacher and one machine are merged by row name: a row at 10 minutes in one and at 20 in
the other is one curve.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from atomicio import write_atomic

REFERENCES = ("teacher", "student on real labels", "KD on real images")


def parse_source(spec: str) -> tuple[Path, tuple[str, ...]]:
    """``FILE.json`` or ``FILE.json:ROW;ROW``."""
    path, _, rows = spec.partition(".json:")
    if not rows:
        return Path(spec), ()
    return Path(path + ".json"), tuple(r.strip() for r in rows.split(";") if r.strip())


def pick_rows(sources: list[tuple[Path, tuple[str, ...]]]) -> tuple[list[dict[str, Any]], int]:
    """The rows to draw in order, and how many of them (first) are references."""
    references: dict[str, dict[str, Any]] = {}
    picked: list[dict[str, Any]] = []
    for path, rows in sources:
        data = dict(json.loads(path.read_text())["rows"])
        for key in REFERENCES:
            if key in data:
                references.setdefault(key, data[key])
        for key in rows or [k for k in data if k not in REFERENCES]:
            if key not in data:
                raise SystemExit(f"{path} has no row {key!r}; it has: {', '.join(data)}")
            picked.append(data[key])
    ordered = [references[key] for key in REFERENCES if key in references]
    return ordered + picked, len(ordered)


def plot_walltime(sources: list[tuple[Path, tuple[str, ...]]], out: Path) -> None:
    """Equal-wall-time results files' figure, of the rows asked for (default: all). Several files (e.g. one per
    total budget, run in different sittings) are merged by row name into curves over wall time; they must share the
    teacher and the machine (a curve across machines would mix their images/s), and no run may be in two of them."""
    from . import tables

    results: dict[str, list[dict[str, Any]]] = {}
    teachers, machines = set(), set()
    for path, rows in sources:
        data = json.loads(path.read_text())
        missing = [key for key in rows if key not in data["rows"]]
        if missing:
            raise SystemExit(f"{path} has no row {missing[0]!r}; it has: {', '.join(data['rows'])}")
        for key, points in data["rows"].items():
            if not rows or key in rows:
                results.setdefault(key, []).extend(points)
        env = data["environment"]
        teachers.add(data["teacher_accuracy"])
        machines.add(f"{env['device']}, {env['lanes']} x {env['cpu_threads']} thread(s)")
    if len(teachers) > 1 or len(machines) > 1:
        raise SystemExit(f"these results files differ in teacher ({sorted(teachers)}) or machine ({sorted(machines)}):"
                         " draw them apart")
    for key, points in results.items():
        runs = [(p["seed"], p["total_budget_seconds"], p.get("synthesis_share")) for p in points]
        if len(set(runs)) < len(runs):
            raise SystemExit(f"row {key!r} has the same seed and budget in two of these files: pick its rows")
    tables.plot_curves(results, teachers.pop(), out, machines.pop())


def is_walltime(path: Path) -> bool:
    return all(isinstance(points, list) for points in json.loads(path.read_text())["rows"].values())


def plot(sources: list[tuple[Path, tuple[str, ...]]], out: Path) -> None:
    if all(is_walltime(path) for path, _ in sources):
        plot_walltime(sources, out)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked, references = pick_rows(sources)
    names = [row["name"].replace("wrn16_1: ", "").replace(" (512 real images)", "\n(512 real)") for row in picked]
    acc = [row["accuracy"] for row in picked]
    means = [a["mean"] * 100 for a in acc]
    below = [(a["mean"] - a["min"]) * 100 for a in acc]
    above = [(a["max"] - a["mean"]) * 100 for a in acc]
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.3 * len(names)), dpi=120)
    ax.barh(range(len(names)), means, xerr=[below, above], capsize=3,
            color=["#888"] * references + ["#1f77b4"] * (len(names) - references))
    for i, (mean, a, up) in enumerate(zip(means, acc, above, strict=True)):
        label = f"{mean:.1f}%" + (f" (n={a['n']})" if a["n"] > 1 else "")
        ax.text(mean + up + 1, i, label, va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("WRN-16-1 test accuracy on real FMNIST (%); bars: range over seeds")
    ax.set_title("512 synthetic images per method, shipped WRN-16-2 teacher, 2-core CPU\n"
                 "both stages fp32 unless the row says bf16", fontsize=9)
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    plot([parse_source(spec) for spec in sys.argv[2:]], Path(sys.argv[1]))

"""The README's results figure from a benchmark's results JSON: accuracy per row with the seed range.

    python -m pipelines.results_plot pipelines/results/fmnist32-cpu-precision.json docs/results-512.png [ROW ...]

ROW: the rows to draw, by their name in the JSON (default: the references, then every row of the file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REFERENCES = ("teacher", "student on real labels", "KD on real images")


def plot(results: Path, out: Path, rows: tuple[str, ...] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = dict(json.loads(results.read_text())["rows"])
    rows = rows or tuple(dict.fromkeys([*(r for r in REFERENCES if r in data), *data]))
    picked = [data[key] for key in rows if key in data]
    names = [row["name"].replace("wrn16_1: ", "").replace(" (512 real images)", "\n(512 real)") for row in picked]
    acc = [row["accuracy"] for row in picked]
    means = [a["mean"] * 100 for a in acc]
    below = [(a["mean"] - a["min"]) * 100 for a in acc]
    above = [(a["max"] - a["mean"]) * 100 for a in acc]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=120)
    references = sum(1 for key in rows if key in REFERENCES and key in data)
    ax.barh(range(len(names)), means, xerr=[below, above], capsize=3,
            color=["#888"] * references + ["#1f77b4"] * (len(names) - references))
    for i, (mean, a, up) in enumerate(zip(means, acc, above, strict=True)):
        label = f"{mean:.1f}%" + (f" (n={a['n']})" if a["n"] > 1 else "")
        ax.text(mean + up + 1, i, label, va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("WRN-16-1 test accuracy on real FMNIST (%); bars: range over seeds")
    ax.set_title("512 synthetic images per method, shipped WRN-16-2 teacher, 2-core CPU", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    plot(Path(sys.argv[1]), Path(sys.argv[2]), tuple(sys.argv[3:]))

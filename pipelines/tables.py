"""The benchmarks' tables and plot: accuracy over seeds, and which rows may be ranked.

Rows are ranked by mean accuracy over their seeds. Two marks keep an undecided row from passing for a decided one:

* ``‡``: fewer than :data:`MIN_SEEDS` seeds. One seed moves a student by about 5 points at these budgets, so
  such a row is ranked but marked, and the table says why.
* over budget: a run whose synthesis + distillation took more than :data:`OVERRUN_TOLERANCE` over its time
  budget had more time than the rows it would be ranked against; it is listed, marked, and not ranked.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from atomicio import write_atomic

MIN_SEEDS = 3
OVERRUN_TOLERANCE = 0.05
FEW_SEEDS = "‡"  # not †: the results notes use † for budget-starved Fast rows (issue 20)

FEW_SEEDS_NOTE = (f"{FEW_SEEDS} fewer than {MIN_SEEDS} seeds: one seed moves the student by about 5 points at "
                  "these budgets, so this row's place is not decided.")
OVERRUN_NOTE = (f"Over budget: synthesis + distillation took more than {OVERRUN_TOLERANCE:.0%} over the total "
                "budget in at least one seed; the row had more time than the others and is not ranked.")


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, range and count of one row's figures over its seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def accuracy_cell(s: dict[str, float], count: bool = True) -> str:
    """``55.00% ± 5.00 (50.00–60.00%, n=3)``; a row with fewer than MIN_SEEDS seeds carries ``‡`` and its count
    always; ``count=False`` leaves out a full row's ``n`` (for tables whose header says it)."""
    mark = f" {FEW_SEEDS}" if s["n"] < MIN_SEEDS else ""
    if s["n"] == 1:
        return f"{s['mean']:.2%} (n=1){mark}"
    n = f", n={s['n']}" if count or mark else ""
    return f"{s['mean']:.2%} ± {s['std'] * 100:.2f} ({s['min'] * 100:.2f}–{s['max']:.2%}{n}){mark}"


def over_budget(used_seconds: float, budget_seconds: float) -> float:
    """How far over its budget a run went (0.12: 12% over; negative: under)."""
    return used_seconds / budget_seconds - 1


def ranks(rows: dict[str, dict[str, Any]]) -> dict[str, int | None]:
    """Rank of each row by mean accuracy (1 = best) among rows that may be ranked (``rankable`` true);
    None for the others. ``rows``: name -> {"accuracy": spread, "rankable": bool}."""
    eligible = sorted((name for name, row in rows.items() if row.get("rankable", True)),
                      key=lambda name: -rows[name]["accuracy"]["mean"])
    order = {name: place for place, name in enumerate(eligible, start=1)}
    return {name: order.get(name) for name in rows}


def rank_cell(rank: int | None, n_seeds: int, over: float | None = None) -> str:
    if rank is None:
        return f"– (over budget {over:+.0%})" if over is not None else "–"
    return f"{rank}{' ' + FEW_SEEDS if n_seeds < MIN_SEEDS else ''}"


def fmt(value: Any, kind: str) -> str:
    """One table cell: '–' for a missing figure."""
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return {"pct": f"{value:.2%}", "pct1": f"{value:.1%}", "ratio": f"{value:.3f}", "int": f"{value:,.0f}",
            "mb": f"{value / 2**20:,.0f}", "s": f"{value:,.0f}", "f2": f"{value:.2f}", "f3": f"{value:.3f}",
            "signed": f"{value:+.1%}", "pct0": f"{value:.0%}"}[kind]


# -- equal images (pipelines/benchmark.py) ----------------------------------------------------------------------

def _cpu_per_wall(cpu: float | None, wall: float | None) -> float | None:
    return cpu / wall if cpu is not None and wall else None


def sittings_threads(env: dict[str, Any]) -> str:
    """Says so when reused runs of earlier sittings ran with other thread counts than this sitting's lanes."""
    threads = env.get("run_threads") or []
    if not threads or threads == [env.get("cpu_threads")]:
        return ""
    return (f" (this sitting's lanes; the runs, some reused from other sittings, ran with "
            f"{' or '.join(map(str, threads))} thread(s) each: `threads` per run in the .json)")


def equal_images_table(spec: dict[str, Any], budget: dict[str, Any], results: dict[str, dict[str, Any]],
                       env: dict[str, Any]) -> str:
    """One row per benchmark row (mean over its seeds), ranked by accuracy; reference rows are not ranked."""
    ranked = ranks({name: {**r, "rankable": not r.get("reference")} for name, r in results.items()})
    lines = [
        f"# {spec.get('title', spec['name'])}", "",
        f"Teacher and budgets shared by every row: {budget['num_images']} images per set "
        f"(`--preset {budget.get('preset', 'cpu')}`), student {spec['student']}, {budget['distill_epochs']} epochs "
        f"at batch {budget['distill_batch_size']}; accuracy on the real {spec['eval_data']} test set as mean ± "
        f"standard deviation (range, number of seeds; each seed drives synthesis and distillation). Machine: "
        f"{env['device']}, torch {env['torch']}; {env['plan']}{sittings_threads(env)}. Synthesis CPU/wall: CPU "
        f"seconds per wall second of the synthesis process (about the run's threads when it had its cores to "
        f"itself).", "",
        "| rank | row | accuracy | student/teacher | synthesis s | synthesis CPU/wall | synthesis img/s "
        "| synthesis peak MB | distill img/s | distill train/wall | distill peak MB | bytes/sample "
        "| teacher agreement | worst class | entropy | separability |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        if r.get("reference"):
            rank, accuracy = "ref.", f"{r['accuracy']['mean']:.2%}"
        else:
            rank, accuracy = rank_cell(ranked[key], r["accuracy"]["n"]), accuracy_cell(r["accuracy"])
        lines.append(
            f"| {rank} | {r['name']} | {accuracy} | {fmt(r.get('ratio'), 'ratio')} "
            f"| {fmt(r.get('synthesis_seconds'), 's')} "
            f"| {fmt(_cpu_per_wall(r.get('synthesis_cpu_seconds'), r.get('synthesis_seconds')), 'f2')} "
            f"| {fmt(r.get('synthesis_images_per_second'), 'f2')} | {fmt(r.get('synthesis_peak_memory_bytes'), 'mb')} "
            f"| {fmt(r.get('distill_images_per_second'), 'int')} | {fmt(r.get('distill_train_share'), 'f2')} "
            f"| {fmt(r.get('distill_peak_memory_bytes'), 'mb')} | {fmt(r.get('bytes_per_sample'), 'int')} "
            f"| {fmt(r.get('teacher_agreement'), 'pct')} | {fmt(r.get('worst_class_agreement'), 'pct')} "
            f"| {fmt(r.get('mean_entropy'), 'f2')} | {fmt(r.get('pairwise_separability'), 'f3')} |")
    if any(not r.get("reference") and r["accuracy"]["n"] < MIN_SEEDS for r in results.values()):
        lines += ["", FEW_SEEDS_NOTE]
    return "\n".join(lines) + "\n"


# -- equal wall time (pipelines/walltime.py) --------------------------------------------------------------------

Points = dict[str, list[dict[str, Any]]]


def _at(points: list[dict[str, Any]], total: float) -> list[dict[str, Any]]:
    return [p for p in points if p["total_budget_seconds"] == total]


def _mean(values: list[Any]) -> Any:
    """Mean of the numbers (None if any is missing)."""
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sum(values) / len(values)
    return None


def _over(point: dict[str, Any]) -> float:
    return over_budget(point["total_wall_seconds"], point["total_budget_seconds"])


def _point_cpu_per_wall(point: dict[str, Any]) -> float | None:
    """CPU seconds of both commands per wall second of both (evaluation included on both sides)."""
    cpu = [point.get("synthesis_cpu_seconds"), point.get("distill_cpu_seconds")]
    if None in cpu:
        return None
    wall = point["synthesis_wall_seconds"] + point["distill_wall_seconds"] + (point.get("distill_eval_seconds") or 0)
    return sum(cpu) / wall if wall else None


def budget_status(points: list[dict[str, Any]]) -> tuple[float, bool]:
    """The worst seed's overrun of its budget, and whether the row may be ranked (no seed over 5%)."""
    worst = max(_over(p) for p in points)
    return worst, worst <= OVERRUN_TOLERANCE


def walltime_tables(spec: dict[str, Any], budget: dict[str, Any], teacher_acc: float, results: Points,
                    env: dict[str, Any], chosen: dict[str, float] | None = None) -> str:
    from timebudget import format_duration

    lines = [f"# {spec.get('title', spec['name'])}", "",
             f"Teacher {teacher_acc:.2%} on the real {spec['eval_data']} test set; student {spec['student']}. "
             "Synthesis gets the share of each total budget in the share column (`synth run --time-budget`, "
             "stopping at the first shard after it), distillation the rest (`distill run --time-budget "
             "--budget-covers training`: the final evaluation on the real test set, the same for every method, is "
             "not charged; total s excludes it). Over: the worst seed's total against the budget; a row more than "
             f"{OVERRUN_TOLERANCE:.0%} over is not ranked. CPU/wall: CPU seconds of both commands per wall second "
             f"(about the threads per run when a run had its cores to itself). Figures other than accuracy are "
             f"means over the seeds. Machine: {env['device']}, torch {env['torch']}; {env['plan']}.", ""]
    totals = sorted({p["total_budget_seconds"] for points in results.values() for p in points})
    notes: set[str] = set()
    for total in totals:
        rows = {name: _at(points, total) for name, points in results.items() if _at(points, total)}
        status = {name: budget_status(at) for name, at in rows.items()}
        ranked = ranks({name: {"accuracy": spread([p["accuracy"] for p in at]), "rankable": status[name][1]}
                        for name, at in rows.items()})
        order = sorted(rows, key=lambda name: (ranked[name] is None, ranked[name] or 0))
        lines += [f"## Total budget {format_duration(total)}", "",
                  "| rank | method | share | images | synthesis s | distill s | total s | over | CPU/wall "
                  "| synthesis img/s | distill epochs | accuracy | student/teacher | teacher agreement | worst class |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in order:
            at, (worst, rankable) = rows[name], status[name]
            accuracy = spread([q["accuracy"] for q in at])
            p = {key: _mean([q.get(key) for q in at]) for key in at[0] if key != "student_per_class_accuracy"}
            notes.update(["seeds"] if accuracy["n"] < MIN_SEEDS and rankable else [])
            notes.update([] if rankable else ["over"])
            over = fmt(worst, "signed") if rankable else f"**{worst:+.1%}**"
            lines.append(
                f"| {rank_cell(ranked[name], accuracy['n'], worst)} | {name} | {fmt(p.get('synthesis_share'), 'pct0')} "
                f"| {fmt(p['images'], 'int')} | {fmt(p['synthesis_wall_seconds'], 's')} "
                f"| {fmt(p['distill_wall_seconds'], 's')} | {fmt(p['total_wall_seconds'], 's')} | {over} "
                f"| {fmt(_mean([_point_cpu_per_wall(q) for q in at]), 'f2')} "
                f"| {fmt(p['synthesis_images_per_second'], 'f2')} | {fmt(p['distill_epochs'], 'int')} "
                f"| {accuracy_cell(accuracy)} | {fmt(p['ratio'], 'ratio')} | {fmt(p.get('teacher_agreement'), 'pct1')} "
                f"| {fmt(p.get('worst_class_agreement'), 'pct1')} |")
        lines.append("")
    lines += [note for key, note in (("seeds", FEW_SEEDS_NOTE), ("over", OVERRUN_NOTE)) if key in notes]
    for total in totals if spec.get("baselines") else []:
        lines += ["", *baseline_table(results, total, spec["baselines"])]
    if chosen is not None:
        lines += ["", *share_table(results, chosen)]
    lines += ["", "## Every seed", "",
              "| method | seed | total budget | share | images | total s | over | CPU s | accuracy |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, points in results.items():
        for p in sorted(points, key=lambda q: (q["total_budget_seconds"], q.get("seed", 0))):
            over = _over(p)
            cpu = [p.get("synthesis_cpu_seconds"), p.get("distill_cpu_seconds")]
            continued = " (continued after a kill)" if p.get("continued_from_seconds") else ""
            lines.append(
                f"| {name} | {p.get('seed', '–')}{continued} "
                f"| {format_duration(p['total_budget_seconds'])} "
                f"| {fmt(p.get('synthesis_share'), 'pct0')} | {p['images']:,} | {p['total_wall_seconds']:.0f} "
                f"| {fmt(over, 'signed') if over <= OVERRUN_TOLERANCE else f'**{over:+.1%}** over budget'} "
                f"| {fmt(None if None in cpu else sum(cpu), 's')} | {p['accuracy']:.2%} |")
    return "\n".join(lines) + "\n"


def verdict(row: dict[str, float], baseline: dict[str, float]) -> str:
    """Whether a row beats a baseline by more than the seed spread: its mean ahead by more than the larger of
    the two standard deviations ("ahead"), behind by as much ("behind"), or neither ("within"); with
    one seed on either side there is no spread to compare against ("one seed: undecided")."""
    difference, noise = row["mean"] - baseline["mean"], max(row["std"], baseline["std"])
    if min(row["n"], baseline["n"]) < 2:
        return "one seed: undecided"
    return "ahead" if difference > noise else "behind" if -difference > noise else "within"


def _range(values: list[Any], kind: str) -> str:
    """``3,008–3,072`` over the seeds (one figure when they agree; '–' when one is missing)."""
    if None in values:
        return "–"
    low, high = min(values), max(values)
    return fmt(low, kind) if low == high else f"{fmt(low, kind)}–{fmt(high, kind)}"


def baseline_table(results: Points, total: float, baselines: list[str]) -> list[str]:
    """The headline table at one total budget (the README shows it as is): per row its share, images, student
    accuracy over seeds and teacher agreement, and against each baseline row (``[benchmark] baselines``) the
    difference of mean accuracies with its :func:`verdict`. Rows over budget get no verdict: they had more time."""
    from timebudget import format_duration

    rows = {name: _at(points, total) for name, points in results.items() if _at(points, total)}
    present = [b for b in baselines if b in rows]
    if not present:
        return []
    accuracy = {name: spread([p["accuracy"] for p in at]) for name, at in rows.items()}
    within = {name: budget_status(at)[1] for name, at in rows.items()}
    seeds = max(a["n"] for a in accuracy.values())
    lines = [f"## Against the baselines at {format_duration(total)}", "",
             f"| method | synthesis share | images | student, {seeds} seeds (mean ± sd, range) | "
             + " | ".join(f"vs {b}" for b in present) + " | teacher agreement |",
             "|---|---|---|---|" + "---|" * (len(present) + 1)]
    for name in sorted(rows, key=lambda n: -accuracy[n]["mean"]):
        cells = []
        for b in present:
            if b == name:
                cells.append("–")
            elif not (within[name] and within[b]):
                cells.append("over budget")
            else:
                difference = (accuracy[name]["mean"] - accuracy[b]["mean"]) * 100
                cells.append(f"{difference:+.2f} {verdict(accuracy[name], accuracy[b])}")
        at = rows[name]
        lines.append(f"| {name} | {_range([p.get('synthesis_share') for p in at], 'pct0')} "
                     f"| {_range([p['images'] for p in at], 'int')} | {accuracy_cell(accuracy[name], count=False)} | "
                     + " | ".join(cells) + f" | {fmt(_mean([p.get('teacher_agreement') for p in at]), 'pct1')} |")
    return [*lines, "", "Against a baseline: the difference of mean accuracies in points; *ahead* / *behind*: by "
            "more than the larger of the two rows' standard deviations over seeds, the seed spread; *within*: not."]


def chosen_shares(results: Points) -> dict[str, float]:
    """Per row of a split sweep, the share with the best mean accuracy over seeds at the largest total, among
    shares no seed of which ran over budget (a row with none within budget gets no share: it must be looked at)."""
    by_row: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for points in results.values():
        for p in points:
            by_row.setdefault(p["row"], {}).setdefault(p["synthesis_share"], []).append(p)
    chosen = {}
    for row, shares in by_row.items():
        total = max(p["total_budget_seconds"] for points in shares.values() for p in points)
        scores = {share: spread([p["accuracy"] for p in _at(points, total)])["mean"]
                  for share, points in shares.items() if _at(points, total) and budget_status(_at(points, total))[1]}
        if scores:
            chosen[row] = max(scores, key=lambda share: scores[share])
    return chosen


def share_table(results: Points, chosen: dict[str, float]) -> list[str]:
    rows: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for points in results.values():
        for p in points:
            rows.setdefault(p["row"], {}).setdefault(p["synthesis_share"], []).append(p)
    shares = sorted({share for by_share in rows.values() for share in by_share})
    lines = ["## Synthesis share chosen per method", "",
             "Mean accuracy over seeds at the sweep's largest total; the chosen share is the best one within "
             "budget. Files that fix it read this file's `chosen_shares` (`share_from`).", "",
             "| method | " + " | ".join(f"{s:.0%}" for s in shares) + " | chosen |",
             "|---|" + "---|" * (len(shares) + 1)]
    for row, by_share in rows.items():
        total = max(p["total_budget_seconds"] for points in by_share.values() for p in points)
        cells = []
        for share in shares:
            at = _at(by_share.get(share, []), total)
            if not at:
                cells.append("–")
                continue
            within = budget_status(at)[1]
            cells.append(accuracy_cell(spread([p["accuracy"] for p in at])) + ("" if within else " (over budget)"))
        pick = chosen.get(row)
        choice = "none within budget" if pick is None else f"{pick:.0%}"
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {choice} |")
    return lines


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: Points, teacher_acc: float, path: Path, machine: str) -> None:
    """Accuracy against total wall time, one line per row: the mean with the seeds' range; a row of fewer than
    MIN_SEEDS seeds carries ‡ in the legend, and points over budget are hollow on a dashed line. When every row
    ran at one budget the lines would be a stack of points at one x: :func:`plot_one_budget` draws them instead."""
    budgets = {p["total_budget_seconds"] for points in results.values() for p in points}
    if len(budgets) == 1:
        plot_one_budget(results, teacher_acc, path, machine, budgets.pop())
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    few = False
    for name, points in results.items():
        groups = [_at(points, t) for t in sorted({p["total_budget_seconds"] for p in points})]
        x = [statistics.fmean(p["total_wall_seconds"] for p in g) / 60 for g in groups]
        y = [statistics.fmean(100 * p["accuracy"] for p in g) for g in groups]
        low = [m - min(100 * p["accuracy"] for p in g) for m, g in zip(y, groups, strict=True)]
        high = [max(100 * p["accuracy"] for p in g) - m for m, g in zip(y, groups, strict=True)]
        over = [not budget_status(g)[1] for g in groups]
        few = few or min(len(g) for g in groups) < MIN_SEEDS
        label = name + (f" {FEW_SEEDS}" if min(len(g) for g in groups) < MIN_SEEDS else "") + \
            (" (over budget)" if any(over) else "")
        line = ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=label,
                           linestyle="--" if any(over) else "-")
        if any(over):  # hollow markers on the points that ran over budget
            ax.scatter([v for v, o in zip(x, over, strict=True) if o], [v for v, o in zip(y, over, strict=True) if o],
                       s=60, facecolors="white", edgecolors=line[0].get_color(), zorder=3)
    ax.axhline(100 * teacher_acc, color="grey", linestyle="--", linewidth=1, label="teacher")
    ax.set_xlabel("total wall time, synthesis + distillation (minutes)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"Student accuracy at equal wall time ({machine})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if few:
        fig.text(0.01, 0.01, f"{FEW_SEEDS} fewer than {MIN_SEEDS} seeds", fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_one_budget(results: Points, teacher_acc: float, path: Path, machine: str, budget: float) -> None:
    """One budget: a line per row, best mean on top, with every seed's student as a dot, the mean as a bar tick
    and the seeds' range as a line; rows over budget are drawn hollow and say so, rows of few seeds carry ‡."""
    plt = _pyplot()
    order = sorted(results, key=lambda name: statistics.fmean(p["accuracy"] for p in results[name]))
    fig, ax = plt.subplots(figsize=(8.5, 1.4 + 0.38 * len(order)), dpi=120)
    few, labels = False, []
    for y, name in enumerate(order):
        values = [100 * p["accuracy"] for p in results[name]]
        over = not budget_status(results[name])[1]
        few = few or len(values) < MIN_SEEDS
        labels.append(name + (f" {FEW_SEEDS}" if len(values) < MIN_SEEDS else "") + (" (over budget)" if over else ""))
        color = "tab:grey" if over else "tab:blue"
        ax.hlines(y, min(values), max(values), color=color, linewidth=2, alpha=0.5)
        ax.scatter(values, [y] * len(values), s=18, edgecolors=color, facecolors="white" if over else color, zorder=3)
        ax.plot([statistics.fmean(values)] * 2, [y - 0.3, y + 0.3], color="black", linewidth=1.5, zorder=4)
    ax.set_yticks(range(len(order)), labels, fontsize=8)
    ax.axvline(100 * teacher_acc, color="grey", linestyle="--", linewidth=1)
    ax.text(100 * teacher_acc, len(order) - 0.4, " teacher", fontsize=7, color="grey", va="bottom", ha="right")
    ax.set_ylim(-0.7, len(order) - 0.1)
    ax.set_xlabel(f"student test accuracy (%): each seed a dot, the mean a tick\n{budget / 60:g} minutes of "
                  "synthesis + distillation per run", fontsize=8)
    ax.set_title(f"Student accuracy at equal wall time ({machine})", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if few:
        fig.text(0.01, 0.01, f"{FEW_SEEDS} fewer than {MIN_SEEDS} seeds", fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)

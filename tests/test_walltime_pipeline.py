"""The equal-wall-time benchmark's bookkeeping (pipelines/walltime.py): seeds per row, where each run's points
live, and the tables' spread. The runs themselves are the benchmark's job, not the tests'."""

from __future__ import annotations

import json

import pytest

from pipelines.walltime import WallTimeBenchmark, format_tables

PIPELINE = {
    "benchmark": {"name": "t", "student": "resnet8", "eval_data": "none", "out": "", "teacher": "t.pt",
                  "seeds": [0]},
    "budget": {"totals": ["1m"], "synthesis_share": 0.75, "shard_size": 8},
    "rows": [{"name": "a", "method": "gmi", "seeds": [0, 1, 2]}, {"name": "b c", "method": "fast"}],
}


def _point(seed: int, accuracy: float) -> dict:
    return {"seed": seed, "total_budget_seconds": 60.0, "images": 64 * (seed + 1), "synthesis_wall_seconds": 45.0,
            "synthesis_images_per_second": 1.0, "distill_wall_seconds": 15.0, "distill_epochs": 3,
            "distill_images_per_second": 100.0, "distill_train_share": 0.9, "total_wall_seconds": 60.0,
            "accuracy": accuracy, "ratio": accuracy / 0.9, "teacher_agreement": 0.5, "worst_class_agreement": 0.1}


def test_every_seed_of_a_row_has_its_own_folder_and_the_table_gives_their_spread(tmp_path):
    spec = json.loads(json.dumps(PIPELINE))
    spec["benchmark"]["out"] = str(tmp_path)
    bench = WallTimeBenchmark(spec, fresh=False)
    assert bench.seeds(spec["rows"][0]) == [0, 1, 2] and bench.seeds(spec["rows"][1]) == [0]
    assert bench.row_dir(spec["rows"][0], 2) == tmp_path / "a" / "seed-2"
    for seed, accuracy in ((0, 0.50), (1, 0.60), (2, 0.55)):
        point = bench.row_dir(spec["rows"][0], seed) / "total-1m00s" / "point.json"
        point.parent.mkdir(parents=True)
        point.write_text(json.dumps(_point(seed, accuracy)))
    found = bench.finished_points()
    assert list(found) == ["a"] and [p["seed"] for p in found["a"]] == [0, 1, 2]
    table = format_tables(spec["benchmark"], spec["budget"], 0.9, found, {"device": "CPU", "torch": "x",
                                                                          "cpu_threads": 1, "lanes": 4})
    row = next(line for line in table.splitlines() if line.startswith("| a |"))
    assert "| 128 |" in row  # images: the mean over the seeds
    assert "55.00% ± 5.00% (50.00%–60.00%, 3)" in row
    assert "| a | 2 | 1m00s | 192 | 55.00% |" in table  # every seed listed


def test_a_pipeline_with_one_seed_keeps_the_old_layout(tmp_path):
    spec = json.loads(json.dumps(PIPELINE))
    spec["benchmark"] = {**spec["benchmark"], "out": str(tmp_path), "seed": 3}
    del spec["benchmark"]["seeds"]
    del spec["rows"][0]["seeds"]
    bench = WallTimeBenchmark(spec, fresh=False)
    assert bench.seeds(spec["rows"][0]) == [3]
    assert bench.row_dir(spec["rows"][0], 3) == tmp_path / "a"


def test_share_outside_zero_and_one_is_refused():
    spec = json.loads(json.dumps(PIPELINE))
    spec["budget"]["synthesis_share"] = 1.0
    with pytest.raises(ValueError, match="synthesis_share"):
        WallTimeBenchmark(spec, fresh=False)

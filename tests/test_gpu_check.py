"""``pipelines/gpu_check.py --smoke``: the GPU check's code paths on the CPU, so that it does not rot."""

from __future__ import annotations

import json

from pipelines import gpu_check


def test_gpu_check_smoke_runs_every_kind_of_run_and_writes_the_json(tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    ran = {(r["kind"], r["method"], r["precision"]) for r in report["runs"]}
    assert ran == {("synth", "gmi", "bf16"), ("synth", "kgen", "bf16"), ("synth", "diffdfkd", "bf16"),
                   ("distill", "distill run", "bf16")}
    assert all(r["error"] is None and r["images_per_second"] > 0 for r in report["runs"])
    assert report["smoke"] is True and report["errors"] == 0
    # Each timed run had its warm-up copy first, so first uses of kernels stay out of its images/s.
    warmed = {(w["kind"], w["method"], w["precision"]) for w in report["warm_ups"]}
    assert warmed == ran
    assert "| gmi | " in out.with_suffix(".md").read_text()  # the table people read


def test_speedups_are_each_precisions_images_per_second_over_fp32s_per_method():
    runs = [{"method": "gmi", "precision": "fp32", "images_per_second": 100.0},
            {"method": "gmi", "precision": "bf16", "images_per_second": 250.0},
            {"method": "cmi", "precision": "bf16", "images_per_second": 80.0},  # no fp32 run: no ratio
            {"method": "fast", "precision": "fp32", "images_per_second": 50.0},
            {"method": "fast", "precision": "fp16", "error": "skipped: budget"}]
    assert gpu_check.speedups(runs) == {"gmi": {"bf16": 2.5}}


def test_the_full_check_keeps_the_paper_networks_and_caps_only_step_counts():
    assert gpu_check._method_args("deepinversion", smoke=False, max_steps=50) == ["--iterations", "50"]
    d2cip = gpu_check._method_args("d2cip", smoke=False, max_steps=50)
    assert "--prior-iterations" in d2cip and "--batch-size" not in d2cip
    assert gpu_check._batch_size("gmi", gpu_check._method_args("gmi", smoke=False, max_steps=50)) == 256
    assert gpu_check._method_args("kgen", smoke=False, max_steps=50)[-2:] == ["--class-embedding", "centre"]

"""``synth run --time-budget``: every second counts, set-up included; the run stops after the batch it ran out in
(no more than one batch past its budget), and a larger budget continues with exactly the samples of an
uninterrupted run.

The runs here charge their work to a manual clock (the ``batch_clock`` fixture: so many clock seconds per stored
batch, and per D2CIP stage-1 iteration where a test says so), never to the machine's speed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

import shards
from synth.commands.cli import main

FAST_GMI = ["--batch-size", "8", "--inversion-steps", "2", "--kd-steps", "1", "--proxy-student", "resnet8",
            "--memory-capacity", "64", "--device", "cpu", "--quiet", "--preset", "paper"]


def _run(*args: str):
    return CliRunner().invoke(main, ["run", *args], catch_exceptions=False)


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _samples(out: Path) -> dict[str, str]:
    """key -> digest of the stored image, label and logits: what a student learns from, shard layout aside."""
    arrays = shards.load_arrays(out, progress=False)
    return {key: hashlib.sha256(arrays.images[i].tobytes() + arrays.logits[i].tobytes()
                                + int(arrays.labels[i]).to_bytes(4, "little")).hexdigest()
            for i, key in enumerate(arrays.keys)}


def _dir_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def test_time_budget_stops_after_the_batch_it_ran_out_in_and_a_larger_budget_continues_exactly(
        tmp_path, tiny_teacher, batch_clock):
    batch_clock.per_batch = 0.2  # batches of 8 end at 0.2, 0.4, 0.6 s: the third runs out of a 0.5 s budget
    base = ["gmi", "--teacher", str(tiny_teacher), "--num-images", "32", "--shard-size", "16", *FAST_GMI]
    out = tmp_path / "budget"
    first = _run(*base, "--out", str(out), "--time-budget", "0.5s")
    assert first.exit_code == 0, first.output
    assert "stopped by the time budget" in first.output
    manifest = _manifest(out)
    assert manifest["complete"] and manifest["stop"]["reason"] == "time_budget"
    assert manifest["stop"]["time_budget_seconds"] == 0.5 and manifest["stop"]["requested_images"] == 32
    # One full shard, then the batch the budget ran out in as a shorter shard: not a shard boundary later.
    assert [s["num_samples"] for s in manifest["shards"]] == [16, 8]
    assert 0.5 <= manifest["summary"]["synthesis_seconds"] <= 0.5 + 0.2
    assert manifest["summary"]["time_budget"] == {"budget_seconds": 0.5, "used_seconds": 0.6}
    assert shards.verify(out) == []

    # The same budget again: already spent, nothing changes.
    before = _dir_digest(out)
    again = _run(*base, "--out", str(out), "--time-budget", "0.5s")
    assert again.exit_code == 0 and "is spent" in again.output and _dir_digest(out) == before

    # A larger budget continues from the resume state kept at the stop: the samples of an uninterrupted run.
    more = _run(*base, "--out", str(out), "--time-budget", "1h")
    assert more.exit_code == 0, more.output
    final = _manifest(out)
    assert final["num_samples"] == 32 and final["complete"] and final.get("stop") is None
    clean = tmp_path / "clean"
    assert _run(*base, "--out", str(clean)).exit_code == 0
    assert _samples(clean) == _samples(out) and sorted(_samples(out)) == [f"{i:09d}" for i in range(32)]


def test_time_budget_without_an_image_count_makes_as_many_as_fit_in_one_batch_shards(
        tmp_path, tiny_teacher, batch_clock):
    batch_clock.per_batch = 1.0
    out = tmp_path / "budget-only"
    result = _run("gmi", "--out", str(out), "--teacher", str(tiny_teacher), "--time-budget", "3s", *FAST_GMI)
    assert result.exit_code == 0, result.output
    manifest = _manifest(out)
    assert manifest["target_samples"] == 50_000 and manifest["shard_size"] == 8  # --batch-size 8
    assert manifest["stop"]["reason"] == "time_budget" and manifest["num_samples"] == 3 * 8
    assert all(s["num_samples"] == 8 for s in manifest["shards"])
    assert shards.verify(out) == []


def test_d2cip_stage_1_stops_at_its_share_of_the_budget_and_the_run_still_makes_images(
        tmp_path, tiny_teacher, batch_clock, monkeypatch):
    from synth.methods.d2cip import D2CIP

    batch_clock.per_batch = 0.5
    real = D2CIP.stage1_terms

    def charged(self, logits, labels):  # each stage-1 iteration costs 0.25 clock seconds
        batch_clock.advance(0.25)
        return real(self, logits, labels)

    monkeypatch.setattr(D2CIP, "stage1_terms", charged)
    out = tmp_path / "d2cip"
    result = _run("d2cip", "--out", str(out), "--teacher", str(tiny_teacher), "--num-images", "64",
                  "--shard-size", "8", "--time-budget", "4s", *FAST_GMI, "--prior-iterations", "1000",
                  "--latent-dim", "16", "--generator-width", "8", "--bank-size", "16")
    assert result.exit_code == 0, result.output
    manifest = _manifest(out)
    # Stage 1 may spend half the budget (2 s = 8 iterations), not the 250 s its 1,000 iterations would take.
    assert manifest["summary"]["prepare"] == {"stage1_iterations": 8, "stage1_iterations_asked": 1000,
                                              "stopped_by": "time_budget"}
    assert "prior.pt" in manifest["artifacts"]  # the prior learnt so far is the dataset's prior
    # The rest of the budget makes images, 4 batches of 8 (0.5 s each), and the run ends with the budget.
    assert manifest["num_samples"] == 32 and manifest["stop"]["reason"] == "time_budget"
    assert 4.0 <= manifest["summary"]["synthesis_seconds"] <= 4.0 + 0.5
    assert np.isfinite(shards.load_arrays(out, progress=False).logits.astype(np.float32)).all()

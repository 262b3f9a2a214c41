"""End-to-end behaviour of ``synth run``: the dataset contract as a user relies on it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import shards
import zoo
from synth.commands.cli import main

FAST_GMI = ["--batch-size", "8", "--inversion-steps", "2", "--kd-steps", "1", "--proxy-student", "resnet8",
            "--memory-capacity", "64", "--device", "cpu", "--quiet", "--preset", "paper"]


def _synth(*args: str) -> CliRunner.invoke:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _dir_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_gmi_run_writes_a_verified_dataset_whose_logits_match_the_teacher(tmp_path, tiny_teacher):
    out = tmp_path / "set"
    result = _synth("run", "gmi", "--out", str(out), "--teacher", str(tiny_teacher), "--num-images", "40",
                    "--shard-size", "16", *FAST_GMI)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 40 and manifest["complete"]
    assert [s["num_samples"] for s in manifest["shards"]] == [16, 16, 8]
    assert manifest["method"]["name"] == "gmi"
    assert manifest["teacher"]["sha256"] == hashlib.sha256(tiny_teacher.read_bytes()).hexdigest()
    assert sum(manifest["class_counts"]) == 40
    assert "pairwise_separability" in manifest["summary"]["diversity"]
    assert shards.verify(out) == []
    # Per class, the share of its images the teacher assigns to it: 1 where every image is, else less.
    arrays = shards.load_arrays(out, progress=False)
    predicted = arrays.logits.astype(np.float32).argmax(axis=1)
    expected = [float((predicted[arrays.labels == c] == c).mean()) for c in range(10)]
    assert manifest["summary"]["per_class_agreement"] == pytest.approx(expected)

    # Every stored logit is the teacher's output on exactly the stored (decoded, uint8) image.
    arrays = shards.load_arrays(out, progress=False)
    teacher = zoo.load_classifier(tiny_teacher).eval()
    with torch.no_grad():
        recomputed = teacher(torch.from_numpy(arrays.images).permute(0, 3, 1, 2).float() / 255).numpy()
    stored = arrays.logits.astype(np.float32)
    np.testing.assert_allclose(stored, recomputed, rtol=2e-3, atol=2e-3)  # float16 storage

    verify = _synth("verify", str(out))
    assert verify.exit_code == 0 and "OK" in verify.output


def test_run_into_a_dataset_of_another_method_or_teacher_refuses_and_changes_nothing(tmp_path, tiny_teacher,
                                                                                   other_teacher):
    out = tmp_path / "set"
    assert _synth("run", "gmi", "--out", str(out), "--teacher", str(tiny_teacher), "--num-images", "16",
                  "--shard-size", "8", *FAST_GMI).exit_code == 0
    before = _dir_digest(out)
    other_method = CliRunner().invoke(main, ["run", "deepinversion", "--out", str(out), "--teacher", str(tiny_teacher),
                                             "--num-images", "16", "--batch-size", "8", "--iterations", "1",
                                             "--device", "cpu", "--quiet"])
    assert other_method.exit_code != 0
    assert "method" in other_method.output
    other = CliRunner().invoke(main, ["run", "gmi", "--out", str(out), "--teacher", str(other_teacher),
                                      "--num-images", "16", "--shard-size", "8", *FAST_GMI])
    assert other.exit_code != 0
    assert "teacher" in other.output
    assert _dir_digest(out) == before


def _shard_hashes(out: Path) -> list[str]:
    return [s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]]


METHOD_ARGS = {
    "gmi": FAST_GMI,
    "d2cip": [*FAST_GMI, "--prior-iterations", "3", "--latent-dim", "16", "--generator-width", "8",
              "--bank-size", "16"],
    "deepinversion": ["--batch-size", "8", "--iterations", "3", "--device", "cpu", "--quiet", "--preset", "paper"],
    "cmi": [*FAST_GMI, "--latent-dim", "16", "--generator-width", "8", "--bank-size", "32", "--negatives", "16"],
    "fast": [*FAST_GMI, "--latent-dim", "16", "--generator-width", "8", "--warmup", "1"],
    "cpsc": [*FAST_GMI, "--latent-dim", "16", "--generator-width", "8"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_sigkill_mid_run_then_rerun_completes_without_duplicates(tmp_path, tiny_teacher, method):
    num_images = 64
    args = ["run", method, "--teacher", str(tiny_teacher), "--num-images", str(num_images), "--shard-size", "8",
            *METHOD_ARGS[method]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "synth", *args, "--out", str(killed)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = killed / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = json.loads(manifest.read_text())
    assert 2 <= len(partial["shards"]) < num_images // 8, "the kill should land mid-run"

    rerun = subprocess.run([sys.executable, "-m", "synth", *args, "--out", str(killed)], env=env,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    final = json.loads(manifest.read_text())
    assert final["num_samples"] == num_images and final["complete"]
    arrays = shards.load_arrays(killed, progress=False)
    assert sorted(arrays.keys) == [f"{i:09d}" for i in range(num_images)]
    assert shards.verify(killed) == []
    assert not (killed / "resume").exists() or not any((killed / "resume").iterdir())

    # Resuming reproduces exactly what an uninterrupted run with the same seed writes.
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "synth", *args, "--out", str(clean)], env=env, check=True,
                   capture_output=True)
    assert _shard_hashes(clean) == _shard_hashes(killed)


def test_synth_list_and_help_show_methods_and_defaults():
    listing = _synth("list")
    for name in ("gmi", "deepinversion", "d2cip"):
        assert name in listing.output
    help_text = _synth("run", "d2cip", "--help").output
    for option in ("--num-components", "--no-scr", "--no-zcr", "--no-cgmm", "--prior", "--shard-size",
                   "[default: 0.8]", "--teacher", "--preset"):
        assert option in help_text, option


def test_unknown_arch_and_missing_teacher_give_clear_errors(tmp_path):
    missing = CliRunner().invoke(main, ["run", "gmi", "--out", str(tmp_path / "x"), "--teacher",
                                        str(tmp_path / "nope.pt"), "--arch", "wrn16_2"])
    assert missing.exit_code != 0 and "nope.pt" in missing.output
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_time_budget_is_read_as_a_person_writes_it():
    from timebudget import parse_duration

    assert parse_duration("20m") == 1200 and parse_duration("1h30m") == 5400 and parse_duration("1.5h") == 5400
    assert parse_duration("45s") == 45 and parse_duration("90") == 90
    for bad in ("twenty minutes", "10x", "-5m", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    bad = CliRunner().invoke(main, ["run", "gmi", "--out", "x", "--time-budget", "soon"])
    assert bad.exit_code == 2 and "90s, 20m, 1h30m" in bad.output

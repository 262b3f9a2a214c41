"""The student side of condensed-guided inversion (distill/mixed.py) and ``synth condense`` (synth/condense.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import shards
from distill.cli import main as distill_main
from distill.data import Batch
from distill.mixed import SyntheticCondensedKD
from distill.objectives import kd_loss
from distill.sources import stream_source
from synth.commands.cli import main as synth_main
from synth.plugins.condensed.condense import CondenseConfig, distribution_matching, embedding_network
from synth.plugins.condensed.data import load_condensed

TINY = ["--batch-size", "10", "--inversion-steps", "1", "--kd-steps", "1", "--proxy-student", "resnet8",
        "--latent-dim", "16", "--generator-width", "8", "--memory-capacity", "64", "--device", "cpu",
        "--quiet", "--preset", "paper"]


def test_two_kd_expectations_weight_synthetic_and_condensed_samples_separately():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 10), torch.randn(6, 10)
    condensed = torch.tensor([True, False, False, True, False, False])
    batch = Batch(torch.zeros(6, 3, 8, 8), torch.zeros(6, dtype=torch.long), teacher, condensed)
    objective = SyntheticCondensedKD(4.0, synthetic_weight=0.3, condensed_weight=2.0)
    loss = objective(student, batch)
    expected = 0.3 * kd_loss(student[~condensed], teacher[~condensed], 4.0) \
        + 2.0 * kd_loss(student[condensed], teacher[condensed], 4.0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert objective.epoch_stats() == {"condensed_share": pytest.approx(1 / 3), "condensed_share_min": pytest.approx(
        1 / 3), "condensed_share_max": pytest.approx(1 / 3)}


def test_distill_learns_from_a_mixed_set_and_reports_the_condensed_share(tmp_path, tiny_teacher):
    npz = tmp_path / "c.npz"
    np.savez(npz, images=np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
             labels=np.repeat(np.arange(10), 2))
    for name, extra in (("mixed", ["--condensed", str(npz), "--fa-weight", "0"]), ("plain", [])):
        result = CliRunner().invoke(synth_main, ["run", "gmi", "--out", str(tmp_path / name), "--teacher",
                                                 str(tiny_teacher), "--num-images", "20", *TINY, *extra])
        assert result.exit_code == 0, result.output
        for cache in ("memory", "stream") if name == "mixed" else ("memory",):
            out = tmp_path / f"student-{name}-{cache}"
            result = CliRunner().invoke(distill_main, ["run", "--shards", str(tmp_path / name), "--student",
                                                       "resnet8", "--epochs", "1", "--batch-size", "8",
                                                       "--eval-data", "none", "--device", "cpu", "--out", str(out),
                                                       "--quiet", "--condensed-weight", "0.5", "--cache", cache,
                                                       "--workers", "1"])
            assert result.exit_code == 0, result.output
            metrics = json.loads((out / "metrics.json").read_text())
            rows = list(csv.DictReader((out / "log.csv").open()))
            if name == "mixed":
                assert metrics["config"]["objective"] == "kd-synthetic+condensed"
                assert metrics["sources"]["condensed"] == 20 and metrics["sources"]["condensed_weight"] == 0.5
                assert 0 < float(rows[0]["condensed_share"]) < 1
                # 20 condensed of 40 samples, every sample seen once per epoch (no batch dropped at 40 / 8)
                assert metrics["sources"]["condensed_share_of_batches"] == pytest.approx(0.5)
            else:
                assert metrics["config"]["objective"] == "kd-stored-logits" and "sources" not in metrics
                assert "condensed_share" not in rows[0]


def test_streamed_batches_mark_the_same_samples_condensed_as_the_in_memory_ones(tmp_path, tiny_teacher):
    npz = tmp_path / "c.npz"
    rng = np.random.default_rng(1)
    np.savez(npz, images=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), labels=np.arange(10))
    result = CliRunner().invoke(synth_main, ["run", "gmi", "--out", str(tmp_path / "mixed"), "--teacher",
                                             str(tiny_teacher), "--num-images", "20", *TINY, "--condensed", str(npz),
                                             "--fa-weight", "0"])
    assert result.exit_code == 0, result.output
    arrays = shards.load_arrays(tmp_path / "mixed", progress=False)
    expected = {arrays.images[i].tobytes(): m.get("source") == "condensed" for i, m in enumerate(arrays.meta)}
    assert sum(expected.values()) == 10
    source = stream_source(str(tmp_path / "mixed"), len(arrays), batch_size=6, device=torch.device("cpu"),
                           augment=False, seed=0, workers=1, with_sources=True)
    seen = {}
    for batch in source.epoch(0):
        assert batch.condensed is not None and batch.condensed.dtype == torch.bool
        images = (batch.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        seen.update({image.tobytes(): bool(flag) for image, flag in zip(images, batch.condensed, strict=True)})
    assert seen == expected


def _real_folder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


def test_distribution_matching_closes_the_mean_embedding_gap():
    rng = np.random.default_rng(0)
    base = np.repeat(rng.integers(0, 256, (2, 3)), 20, 0)[:, None, None, :]  # two classes: a colour + noise
    images = np.clip(base + rng.normal(0, 40, (40, 16, 16, 3)), 0, 255).astype(np.uint8)
    labels = np.repeat(np.arange(2), 20)

    def gap(syn: torch.Tensor) -> float:  # under random networks the condensation never saw
        real = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        total = 0.0
        for seed in range(5):
            torch.manual_seed(10_000 + seed)
            net = embedding_network(3, 32, 16)
            with torch.no_grad():
                total += sum(float((net(real[labels == c]).mean(0) - net(syn[c * 2:(c + 1) * 2]).mean(0)).norm())
                             for c in range(2))
        return total

    config = dict(ipc=2, real_batch=20, net_width=32, augment=False)
    start, _ = distribution_matching(images, labels, 2, CondenseConfig(iterations=0, **config), torch.device("cpu"))
    end, _ = distribution_matching(images, labels, 2, CondenseConfig(iterations=30, **config), torch.device("cpu"))
    assert gap(end) < 0.9 * gap(start)


def test_synth_condense_writes_a_set_that_condensed_accepts_and_refuses_what_it_cannot_do(tmp_path):
    data = _real_folder(tmp_path / "real")
    out = tmp_path / "condensed"
    result = CliRunner().invoke(synth_main, ["condense", "--data", f"imagefolder:{data}", "--ipc", "2", "--out",
                                             str(out), "--iterations", "2", "--real-batch", "4", "--net-width", "8",
                                             "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    loaded = load_condensed(out, num_classes=10, shape=(3, 32, 32))
    assert loaded.per_class(10) == [2] * 10
    assert json.loads((out / "condense.json").read_text())["class_names"][0] == "c0"
    for args, message in ((["--ipc", "51"], "--ipc must be 1-50"), (["--ipc", "7"], "fewer than --ipc 7"),
                          (["--ipc", "1", "--data", "imagefolder:/nonexistent"], "--data")):
        bad = tmp_path / "bad"
        command = ["condense", "--data", f"imagefolder:{data}", "--out", str(bad), "--iterations", "1", *args]
        result = CliRunner().invoke(synth_main, command)
        assert result.exit_code == 1 and message in result.output, result.output
        assert not bad.exists() and not (tmp_path / "bad.tmp").exists()
    result = CliRunner().invoke(synth_main, ["condense", "--data", f"imagefolder:{data}", "--ipc", "1", "--out",
                                             str(out)])
    assert result.exit_code == 1 and "exists" in result.output


@pytest.mark.parametrize("resize", [[], ["--resize", "32"]])
def test_a_multi_resolution_set_with_condensed_samples_distils_with_both_kd_terms(tmp_path, tiny_teacher, resize):
    """K-Gen hosting --condensed: 28x28 and 32x32 synthetic images beside 32x32 condensed ones (once refused with
    "this batch source does not say which samples are condensed", by resolution and resized alike)."""
    npz = tmp_path / "c.npz"
    np.savez(npz, images=np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(10))
    result = CliRunner().invoke(synth_main, ["run", "kgen", "--out", str(tmp_path / "set"), "--teacher",
                                             str(tiny_teacher), "--num-images", "20", *TINY, "--class-embedding",
                                             "centre", "--batch-sizes", "10,10", "--condensed", str(npz)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert manifest["source_counts"] == {"condensed": 10, "synthetic": 20} and len(manifest["resolution_counts"]) == 2
    out = tmp_path / "student"
    result = CliRunner().invoke(distill_main, ["run", "--shards", str(tmp_path / "set"), "--student", "resnet8",
                                               "--epochs", "1", "--batch-size", "8", "--eval-data", "none",
                                               "--device", "cpu", "--out", str(out), "--quiet", *resize])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["objective"] == "kd-synthetic+condensed"
    assert 0 < metrics["sources"]["condensed_share_of_batches"] < 1

"""Shard sets of several image sizes (synth run kgen): writing, reading back with sizes intact, and distill
training from them by resolution or resized."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import shards
from distill.cli import main as distill_main
from distill.data import ResolutionBatches, TensorSource
from synth.commands.cli import main as synth_main


def _samples(start: int, sizes: list[int]) -> list[shards.Sample]:
    out = []
    for i, size in enumerate(sizes):
        rng = np.random.default_rng(start + i)
        out.append(shards.Sample(key=f"{start + i:09d}", image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                                 label=(start + i) % 3, logits=rng.normal(size=3).astype(np.float16),
                                 meta={"source": "synthetic"}))
    return out


def test_mixed_size_shards_round_trip_with_their_sizes(tmp_path):
    out = tmp_path / "set"
    writer = shards.ShardWriter.open(out, identity={"m": 1}, header={}, target_samples=7, shard_size=4,
                                     mixed_sizes=True)
    first, second = _samples(0, [8, 8, 12, 8]), _samples(4, [12, 12, 8])
    writer.commit_shard(first)
    writer.commit_shard(second)
    writer.finish({})
    manifest = shards.read_manifest(out)
    assert manifest["resolution_counts"] == {"12x12": 3, "8x8": 4}
    assert manifest["schema"]["image"]["shapes"] == [[8, 8, 3], [12, 12, 3]]
    assert shards.verify(out) == []
    with pytest.raises(shards.ShardError, match="several sizes.*12x12: 3, 8x8: 4"):
        shards.load_arrays(out, progress=False)
    small = shards.load_arrays(out, progress=False, resolution=(8, 8))
    written = first + second
    assert small.keys == [s.key for s in written if s.image.shape[0] == 8]
    for key, image in zip(small.keys, small.images, strict=True):
        assert np.array_equal(image, written[int(key)].image)  # lossless, at the stored size
    assert [m["resolution"] for m in small.meta] == [[8, 8]] * 4
    resized = shards.load_arrays(out, progress=False, resize=12)
    assert resized.images.shape == (7, 12, 12, 3)
    assert np.array_equal(resized.images[2], written[2].image)  # already 12x12: unchanged
    # Streaming decodes every size too.
    streamed = sorted(image.shape for image, _, _ in shards.stream(out, shuffle=0))
    assert streamed == [(8, 8, 3)] * 4 + [(12, 12, 3)] * 3


def test_resolution_batches_visit_every_sample_once_per_epoch_one_size_per_batch():
    small = TensorSource(torch.zeros(10, 8, 8, 3, dtype=torch.uint8), torch.arange(10), batch_size=4,
                         device=torch.device("cpu"), shuffle=False)
    large = TensorSource(torch.zeros(6, 12, 12, 3, dtype=torch.uint8), torch.arange(10, 16), batch_size=4,
                         device=torch.device("cpu"), shuffle=False)
    source = ResolutionBatches([small, large], seed=3)
    batches = list(source.epoch(0))
    assert len(batches) == len(source) == 5
    assert sorted(int(y) for b in batches for y in b.labels) == list(range(16))
    assert {tuple(b.images.shape[2:]) for b in batches} == {(8, 8), (12, 12)}
    orders = {tuple(b.images.shape[-1] for b in source.epoch(e)) for e in range(6)}
    assert len(orders) > 1  # the interleaving is shuffled per epoch


@pytest.fixture(scope="module")
def kgen_set(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("kgen") / "set"
    result = CliRunner().invoke(synth_main, [
        "run", "kgen", "--out", str(out), "--teacher", str(tiny_teacher), "--class-embedding", "centre",
        "--resolutions", "16,24", "--batch-sizes", "12,8", "--inversion-steps", "1", "--kd-steps", "1",
        "--proxy-student", "resnet8", "--latent-dim", "16", "--generator-width", "8", "--num-images", "40",
        "--shard-size", "16", "--device", "cpu", "--quiet", "--preset", "paper"])
    assert result.exit_code == 0, result.output
    return out


def test_synth_run_kgen_stores_each_resolution_at_its_size(kgen_set):
    manifest = shards.read_manifest(kgen_set)
    assert manifest["resolution_counts"] == {"16x16": 24, "24x24": 16}  # batches of 12 and 8 taking turns
    assert manifest["schema"]["image"]["shapes"] == [[16, 16, 3], [24, 24, 3]]
    speeds = manifest["summary"]["images_per_second_by_resolution"]  # what each size costs to make
    assert set(speeds) == {"16x16", "24x24"} and all(v > 0 for v in speeds.values())
    assert shards.verify(kgen_set) == []
    arrays = shards.load_arrays(kgen_set, progress=False, resolution=(24, 24))
    assert len(arrays) == 16 and all(m["resolution"] == [24, 24] for m in arrays.meta)


@pytest.mark.parametrize("extra, mode", [((), "by-resolution"), (("--resize", "32"), "resized")])
def test_distill_trains_from_a_mixed_size_set_and_reports_how(kgen_set, tmp_path, extra, mode):
    out = tmp_path / "student"
    result = CliRunner().invoke(distill_main, [
        "run", "--shards", str(kgen_set), "--student", "resnet8", "--batch-size", "8", "--epochs", "1",
        "--eval-data", "none", "--out", str(out), "--workers", "0", "--device", "cpu", "--quiet", *extra])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resolutions"]["mode"] == mode
    assert metrics["resolutions"]["counts"] == {"16x16": 24, "24x24": 16}
    assert metrics["resolutions"]["eval_size"] == [32, 32]
    assert metrics["train_images"] == 40


def test_kgen_resumed_after_a_time_budget_stop_writes_the_samples_of_an_uninterrupted_run(tmp_path, tiny_teacher,
                                                                                           batch_clock):
    args = ["run", "kgen", "--teacher", str(tiny_teacher), "--class-embedding", "centre", "--resolutions", "16,24",
            "--batch-sizes", "6,4", "--inversion-steps", "1", "--kd-steps", "1", "--proxy-student", "resnet8",
            "--latent-dim", "16", "--generator-width", "8", "--num-images", "30", "--shard-size", "10",
            "--device", "cpu", "--quiet", "--preset", "paper"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert CliRunner().invoke(synth_main, [*args, "--out", str(straight)]).exit_code == 0
    batch_clock.per_batch = 1.0  # the first batch (6 images at 16x16) spends the budget
    first = CliRunner().invoke(synth_main, [*args, "--out", str(resumed), "--time-budget", "0.5s"])
    assert first.exit_code == 0, first.output
    assert shards.read_manifest(resumed)["num_samples"] == 6  # stopped after the batch it ran out in
    assert CliRunner().invoke(synth_main, [*args, "--out", str(resumed)]).exit_code == 0
    for size in ((16, 16), (24, 24)):  # the same samples, the shard layout aside
        a, b = (shards.load_arrays(out, resolution=size, progress=False) for out in (straight, resumed))
        assert list(a.keys) == list(b.keys) and np.array_equal(a.images, b.images)
        assert np.array_equal(a.logits, b.logits) and np.array_equal(a.labels, b.labels)


def test_synth_inspect_reads_a_mixed_size_set(kgen_set, tmp_path):
    result = CliRunner().invoke(synth_main, ["inspect", str(kgen_set), "--json", "--grid", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["resolution_counts"] == {"16x16": 24, "24x24": 16}
    assert report["image_shape"] == [24, 24, 3]  # shown at the largest size

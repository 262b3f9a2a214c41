"""distill: batch sources, the KD loop, resume, corrupt shards, the CLI end to end on tiny datasets."""

from __future__ import annotations

import ast
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import distill
import realdata
import shards
import zoo
from distill import report
from distill.cli import main
from distill.data import TensorSource, augment_batch
from distill.objectives import kd_loss
from distill.streaming import rebatch
from distill.train import per_class_accuracy

needs_fmnist = pytest.mark.skipif(
    not (realdata.fmnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
# Small and fast: 4 shards of 32 samples, a resnet8 student, batches of 32, 1-2 epochs.
N, SHARD, BATCH = 128, 32, 32


# One intra-op thread: on 2 shared cores, two spinning OpenMP threads per test slow it down 5-10x when anything
# else runs (measured); the models here are far too small to gain from a second thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest


def _write_dataset(out: Path, images: np.ndarray, logits: np.ndarray, teacher_card: dict | None) -> Path:
    header = {"teacher": teacher_card} if teacher_card else {}
    writer = shards.ShardWriter.open(out, identity={"method": "test"}, header=header,
                                     target_samples=len(images), shard_size=SHARD)
    for start in range(0, len(images), SHARD):
        writer.commit_shard([
            shards.Sample(f"{i:09d}", images[i], int(logits[i].argmax()), logits[i].astype(np.float16), {})
            for i in range(start, min(len(images), start + SHARD))
        ])
    writer.finish({})
    return out


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random resnet8 teacher saved with its card (normalisation 0.5/0.25, test_accuracy 0.5)."""
    torch.manual_seed(0)
    mean, std = (0.5,) * 3, (0.25,) * 3
    classifier = zoo.Classifier(zoo.build_model("resnet8", 10, 3), mean, std)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    zoo.save_classifier(classifier, path, arch="resnet8", input_size=32, test_accuracy=0.5,
                        class_names=[f"c{i}" for i in range(10)])
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, teacher_path: Path) -> Path:
    """N random 32×32×3 images labelled by the tiny teacher's logits, in N / SHARD shards."""
    teacher = zoo.load_classifier(teacher_path)
    images = np.random.default_rng(0).integers(0, 256, size=(N, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        logits = teacher(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    return _write_dataset(tmp_path_factory.mktemp("data") / "ds", images, logits, teacher.card.to_dict())


def _run(args: list[str]) -> object:
    result = CliRunner().invoke(main, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _base(dataset: Path, out: Path, *extra: str, workers: int = 0) -> list[str]:
    # workers 0 decodes in this process: spawning decoders costs more than these tiny sets take
    return ["run", "--shards", str(dataset), "--student", "resnet8", "--batch-size", str(BATCH),
            "--out", str(out), "--workers", str(workers), "--quiet", *extra]


def _log_epochs(out: Path) -> list[int]:
    with open(out / "log.csv") as fh:
        return [int(row["epoch"]) for row in csv.DictReader(fh)]


# ------------------------------------------------------------------------------------------ units


def test_augment_batch_is_crop_with_zero_padding_and_flip() -> None:
    x = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8)
    out = augment_batch(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # replay the same draws
    oy = torch.randint(-4, 5, (16, 1), generator=g)
    ox = torch.randint(-4, 5, (16, 1), generator=g)
    flip = torch.rand((16, 1), generator=g) < 0.5
    padded = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (4, 4, 4, 4))
    for i in range(16):
        crop = padded[i, :, 4 + oy[i, 0]: 12 + oy[i, 0], 4 + ox[i, 0]: 12 + ox[i, 0]]
        crop = crop.flip(2) if flip[i, 0] else crop
        assert torch.equal(out[i], crop.permute(1, 2, 0))


def test_tensor_source_epochs_are_seeded_permutations() -> None:
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 2, 2, 1).contiguous()
    src = TensorSource(images, torch.arange(10), None, batch_size=4, device=torch.device("cpu"), seed=1)
    first = [b.labels for b in src.epoch(0)]
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(torch.cat(first).tolist()) == list(range(10))
    assert torch.equal(torch.cat(first), torch.cat([b.labels for b in src.epoch(0)]))
    assert not torch.equal(torch.cat(first), torch.cat([b.labels for b in src.epoch(1)]))
    batch = next(iter(src.epoch(0)))
    assert batch.images.dtype == torch.float32 and batch.images.shape == (4, 1, 2, 2)
    assert torch.allclose(batch.images[:, 0, 0, 0] * 255, batch.labels.float())


def test_per_class_accuracy_counts_each_true_class() -> None:
    """A model that answers "class 0" for images below 0.5 and "class 1" otherwise, on labels 0, 0, 1, 2."""

    class Threshold(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            high = (x.flatten(1).mean(1) > 0.5).float()
            return torch.stack([1 - high, high, torch.zeros_like(high), torch.zeros_like(high)], dim=1)

    images = torch.tensor([0, 255, 255, 255], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 2, 2, 1).contiguous()
    labels = torch.tensor([0, 0, 1, 2])
    source = TensorSource(images, labels, None, batch_size=2, device=torch.device("cpu"), seed=0)
    accuracy, per_class = per_class_accuracy(Threshold(), source, num_classes=4)
    assert accuracy == 0.5 and per_class == [0.5, 1.0, 0.0, None]


def test_kd_loss_and_rebatch() -> None:
    s = torch.randn(4, 10)
    assert kd_loss(s, s.clone(), 4.0).abs() < 1e-6 and kd_loss(s, -s, 4.0) > 0
    parts = [(np.zeros((n, 2, 2, 1), np.uint8), np.arange(n), None) for n in (3, 5, 2)]
    assert [len(b[1]) for b in rebatch(parts, 4)] == [4, 4, 2]


def test_distill_does_not_import_synth() -> None:
    # Static, so it holds for every code path (and costs no torch import in a subprocess).
    for file in Path(distill.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "synth" for n in names), f"{file} imports synth"


# ------------------------------------------------------------------------------------------ distill run


@needs_fmnist
def test_run_writes_all_outputs(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    result = _run(_base(dataset, out, "--epochs", "2", "--eval-data", "fmnist32", "--max-eval-samples", "200"))
    assert result.exit_code == 0, result.output
    assert "student test accuracy:" in result.output and "(teacher: 50.00%)" in result.output
    for name in ("student.pt", "student.card.json", "metrics.json", "log.csv", "accuracy.png", "last.pt"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["data_path"] == "memory" and metrics["images_per_second"] > 0
    assert 0 <= metrics["final_accuracy"] <= 1 and metrics["peak_memory"]["bytes"] > 0
    assert len(metrics["per_class_accuracy"]) == 10
    assert metrics["dataset"]["num_samples"] == N and len(metrics["dataset"]["manifest_sha256"]) == 64
    assert _log_epochs(out) == [1, 2]
    student = zoo.load_classifier(out / "student.pt")
    assert student.card.test_accuracy == metrics["final_accuracy"]
    assert student.card.command.startswith("distill run --shards")
    assert student.card.mean == (0.5, 0.5, 0.5) and student.card.std == (0.25, 0.25, 0.25)  # the teacher's
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_run_streaming_with_workers_and_live_teacher(dataset: Path, teacher_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "stream"
    result = _run(_base(dataset, out, "--epochs", "1", "--cache", "stream", "--teacher", str(teacher_path),
                        workers=2))  # 2 DataLoader worker processes, each streaming its shards
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_path"] == "stream" and metrics["train_images"] == N
    assert metrics["config"]["objective"] == "kd-live-teacher"


def test_run_refuses_students_that_do_not_fit(dataset: Path, tmp_path: Path) -> None:
    five = tmp_path / "five.pt"
    zoo.save_classifier(zoo.Classifier(zoo.build_model("resnet8", 5, 3)), five, arch="resnet8")
    result = _run(_base(dataset, tmp_path / "o1", "--student", str(five)))
    assert result.exit_code == 1
    assert "holds 32×32×3 images of 10 classes" in result.output and "5 outputs" in result.output
    grey = tmp_path / "grey.pt"
    zoo.save_classifier(zoo.Classifier(zoo.build_model("resnet8", 10, 1)), grey, arch="resnet8")
    result = _run(_base(dataset, tmp_path / "o2", "--student", str(grey)))
    assert result.exit_code == 1 and "built for 1-channel input" in result.output
    # LeNet-5 takes 32×32 only: a 28×28×1 dataset is refused before any data is read
    rng = np.random.default_rng(0)
    small = _write_dataset(tmp_path / "small", rng.integers(0, 256, (SHARD, 28, 28, 1), dtype=np.uint8),
                           rng.normal(size=(SHARD, 10)), None)
    result = _run(_base(small, tmp_path / "o3", "--student", "lenet5"))
    assert result.exit_code == 1 and "holds 28×28×1 images of 10 classes" in result.output
    assert "Traceback" not in result.output
    result = _run(_base(dataset, tmp_path / "o4", "--student", "resnet9000"))
    assert result.exit_code == 1 and "unknown architecture" in result.output
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))  # no empty folders left behind


def test_a_second_command_on_an_output_folder_in_use_stops_naming_the_first(dataset: Path, tmp_path: Path) -> None:
    # Two students written into one folder at once would overwrite each other's checkpoint, student and metrics.
    from distill.bookkeeping import RUN_LOCK_NAME
    from shards.lock import FolderLock

    out = tmp_path / "student"
    out.mkdir()
    holder = FolderLock.acquire(out, RUN_LOCK_NAME)  # what a first `distill run/train --out student` holds
    try:
        refused = [_run(_base(dataset, out, "--epochs", "1")),
                   _run(["train", "--data", "fmnist32", "--arch", "resnet8", "--out", str(out), "--epochs", "1",
                         "--max-train-samples", "32", "--max-eval-samples", "32", "--quiet"])]
    finally:
        holder.release()
    for result in refused:
        assert result.exit_code == 1 and f"locked by another writer: pid {os.getpid()}" in result.output
        assert "Traceback" not in result.output
    assert list(out.iterdir()) == []  # the refused commands wrote nothing
    result = _run(_base(dataset, out, "--epochs", "1"))
    assert result.exit_code == 0, result.output
    assert (out / "student.pt").is_file() and not (out / RUN_LOCK_NAME).exists()  # released on the way out


@needs_fmnist
def test_run_refuses_mismatched_eval_data(dataset: Path, tmp_path: Path) -> None:
    result = _run(_base(dataset, tmp_path / "o", "--eval-data", "fmnist"))
    assert result.exit_code == 1 and "--eval-data fmnist holds 28×28×1 images" in result.output


def test_resume_continues_from_next_epoch(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = tmp_path / "straight"
    assert _run(_base(dataset, straight, "--epochs", "2")).exit_code == 0

    out = tmp_path / "resumed"
    real_write = report.write_log_csv

    def interrupt_after_first_epoch(path: Path, history: list) -> None:
        real_write(path, history)
        raise KeyboardInterrupt  # as if killed after epoch 1's checkpoint

    monkeypatch.setattr(report, "write_log_csv", interrupt_after_first_epoch)
    assert _run(_base(dataset, out, "--epochs", "2")).exit_code != 0
    monkeypatch.setattr(report, "write_log_csv", real_write)
    assert _log_epochs(out) == [1] and not (out / "student.pt").exists()

    refused = _run(_base(dataset, out, "--epochs", "2"))
    assert refused.exit_code == 1 and "--resume" in refused.output and "another --out" in refused.output

    result = _run(_base(dataset, out, "--epochs", "2", "--resume"))
    assert result.exit_code == 0, result.output
    assert _log_epochs(out) == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["epochs_this_process"] == 1
    # the interrupted + resumed run is the straight run: same order, augmentation, schedule, optimizer state
    a = torch.load(straight / "student.pt", weights_only=True)
    b = torch.load(out / "student.pt", weights_only=True)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)

    # and a finished run can be extended with a longer schedule
    result = _run(_base(dataset, out, "--epochs", "3", "--resume"))
    assert result.exit_code == 0 and _log_epochs(out) == [1, 2, 3]


def test_resume_refuses_changed_optimiser_seed_augmentation_and_teacher_naming_them(
        dataset: Path, teacher_path: Path, other_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    live = ("--teacher", str(teacher_path))
    assert _run(_base(dataset, out, "--epochs", "1", *live)).exit_code == 0
    for changed, key in ((("--lr", "5.0"), "loop.lr"), (("--weight-decay", "0.01"), "loop.weight_decay"),
                         (("--momentum", "0.5"), "loop.momentum"), (("--seed", "7"), "loop.seed"),
                         (("--augment", "off"), "augment"), (("--teacher", str(other_teacher)), "teacher_sha256")):
        args = (*live, *changed) if changed[0] != "--teacher" else changed
        result = _run(_base(dataset, out, "--epochs", "2", "--resume", *args))
        assert result.exit_code == 1, (changed, result.output)
        assert f"differing: {key}" in result.output and "another --out" in result.output, result.output
        assert _log_epochs(out) == [1]  # nothing trained, the checkpoint kept
    # what may change: the length, the evaluation, where the teacher file lies
    moved = tmp_path / "moved-teacher.pt"
    moved.write_bytes(teacher_path.read_bytes())
    (tmp_path / "moved-teacher.card.json").write_bytes(teacher_path.with_suffix(".card.json").read_bytes())
    result = _run(_base(dataset, out, "--epochs", "2", "--resume", "--teacher", str(moved), "--eval-every", "3"))
    assert result.exit_code == 0, result.output
    assert _log_epochs(out) == [1, 2]


@pytest.mark.parametrize("cache", ["memory", "stream"])
def test_corrupt_shard_fails_naming_it(dataset: Path, tmp_path: Path, cache: str) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    shard = broken / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01  # one flipped bit in the middle of the shard
    shard.write_bytes(bytes(data))
    result = _run(_base(broken, tmp_path / "out", "--epochs", "1", "--cache", cache))
    assert result.exit_code == 1
    assert "shard-000002.tar" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------ distill train


@needs_fmnist
def test_train_on_fmnist32_subset_beats_chance(tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = _run(["train", "--data", "fmnist32", "--arch", "resnet8", "--out", str(out), "--epochs", "1",
                   "--batch-size", "16", "--max-train-samples", "512", "--max-eval-samples", "1000", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    # chance is 0.1; seeds 0-2 give 0.32-0.35 with 32 steps of 16
    assert metrics["final_accuracy"] > 0.2, metrics["final_accuracy"]
    assert metrics["dataset"]["train_samples"] == 512 and metrics["dataset"]["eval_samples"] == 1000
    card = zoo.load_classifier(out / "model.pt").card
    assert card.class_names[0] == "T-shirt/top" and card.dataset == "fmnist32"
    assert card.mean == realdata.NORMALIZATION["fmnist32"][0] and card.test_accuracy == metrics["final_accuracy"]
    assert "test accuracy:" in result.output


def test_train_on_large_imagefolder_streams_through_a_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    import realdata.dataset

    for split, n in (("train", 12), ("test", 4)):
        for label, color in enumerate(((250, 10, 10), (10, 10, 250))):
            folder = tmp_path / "folder" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 24), color).save(folder / f"{i}.png")
    # Pretend the folder is too big for memory: the DataLoader (per-item decoding) path runs.
    monkeypatch.setattr(realdata.dataset, "IMAGEFOLDER_MEMORY_LIMIT", 0)
    out = tmp_path / "model"
    result = _run(["train", "--data", f"imagefolder:{tmp_path / 'folder'}", "--size", "16", "--arch", "resnet8",
                   "--out", str(out), "--epochs", "2", "--batch-size", "8", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_path"] == "loader" and metrics["train_images"] == 2 * 24
    assert metrics["dataset"]["image_shape"] == [16, 16, 3] and metrics["final_accuracy"] is not None
    assert zoo.load_classifier(out / "model.pt").card.class_names == ["class0", "class1"]


@needs_fmnist
def test_progress_evaluations_use_a_subset_and_the_last_the_whole_test_set(dataset: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.runs as runs

    sizes = []
    real_evaluate, real_per_class = runs.evaluate, runs.per_class_accuracy

    def counting_evaluate(model, source, **kwargs):
        sizes.append(source.num_samples)
        return real_evaluate(model, source, **kwargs)

    def counting_per_class(model, source, num_classes):  # the final evaluation: per class too
        sizes.append(source.num_samples)
        return real_per_class(model, source, num_classes)

    monkeypatch.setattr(runs, "evaluate", counting_evaluate)
    monkeypatch.setattr(runs, "per_class_accuracy", counting_per_class)
    out = tmp_path / "evals"
    result = _run(_base(dataset, out, "--epochs", "3", "--eval-data", "fmnist32", "--max-eval-samples", "500",
                        "--eval-every", "1", "--progress-eval-samples", "100"))
    assert result.exit_code == 0, result.output
    assert sizes == [100, 100, 500]

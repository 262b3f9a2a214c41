"""A torchvision ViT student on shards stored below its input size (K-Gen's reduced-patch sets, appendix A.1):
``distill run`` trains it on fewer patches, evaluates and saves it as the plain ViT, and refuses a size its
patches cannot tile with a message that says so, before training."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from shardkit import IDENTITY, NUM_CLASSES, make_samples

import shards
import zoo
from distill.cli import main as distill_main


def _vit_teacher_set(out: Path, side: int) -> Path:
    """8 samples of side x side RGB images, labelled by a (notional) 224-px ViT teacher."""
    header = {"method": {"name": "kgen-s", "seed": 0},
              "teacher": {"arch": "tv:vit_b_16", "input_size": 224, "class_names": [str(i) for i in range(NUM_CLASSES)],
                          "mean": [0.5] * 3, "std": [0.25] * 3}}
    writer = shards.ShardWriter.open(out, identity=IDENTITY, header=header, target_samples=8, shard_size=8)
    writer.commit_shard(make_samples(0, 8, (side, side, 3)))
    writer.finish({})
    writer.close()
    return out


def _distill(shard_dir: Path, out: Path):
    return CliRunner().invoke(distill_main, [
        "run", "--shards", str(shard_dir), "--student", "tv:vit_b_16", "--batch-size", "4", "--epochs", "1",
        "--eval-data", "none", "--out", str(out), "--workers", "0", "--quiet", "--device", "cpu",
        "--objective", "kd"])


def test_a_vit_student_trains_on_fewer_patches_and_is_saved_as_the_plain_vit(tmp_path):
    shard_dir = _vit_teacher_set(tmp_path / "set", 32)  # 2 x 2 patches of 16 px, for a 14 x 14 grid
    torch.manual_seed(0)
    result = _distill(shard_dir, tmp_path / "student")
    assert result.exit_code == 0, result.output
    assert "fewer patches" in result.output
    student = zoo.load_classifier(tmp_path / "student" / "student.pt")  # torchvision's own parameter names
    assert zoo.architectures.torchvision_models.build_torchvision("vit_b_16", NUM_CLASSES).state_dict().keys() \
        == student.network.state_dict().keys()
    with torch.no_grad():
        assert student(torch.rand(1, 3, 224, 224)).shape == (1, NUM_CLASSES)  # evaluated at the full size


def test_a_size_the_vit_patches_cannot_tile_is_refused_before_training(tmp_path):
    shard_dir = _vit_teacher_set(tmp_path / "set", 24)
    result = _distill(shard_dir, tmp_path / "student")
    assert result.exit_code != 0
    assert "multiple of 16" in result.output and "24x24" in result.output
    assert not (tmp_path / "student" / "student.pt").exists()

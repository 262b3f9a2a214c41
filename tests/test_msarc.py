"""mSARC (DiffDFKD Eq. 12): stage choice, Grad-CAM where the class evidence is, the alignment loss and its
gradient, and `distill run --msarc-weight` end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import shards
import zoo
from distill.cli import main
from distill.core import autocast
from distill.msarc import MSARCKD, StageRecorder, cam_alignment_loss, default_stages, grad_cam, stage_pairs


@pytest.mark.parametrize("arch, stages", [("wrn16_1", ["block1", "block2", "block3"]),
                                          ("resnet8", ["layer1", "layer2", "layer3"]),
                                          ("resnet18", ["layer1", "layer2", "layer3", "layer4"]),
                                          ("mobilenetv2", ["blocks", "conv2"]),
                                          ("lenet5", ["conv1", "conv2", "conv3"])])
def test_default_stages_of_zoo_architectures(arch, stages):
    assert default_stages(zoo.build_model(arch, 10, 3)) == stages


def test_stage_pairs_align_the_deepest_stages_and_accept_explicit_ones():
    student, teacher = zoo.build_model("resnet18", 10, 3), zoo.build_model("wrn16_2", 10, 3)
    assert stage_pairs(student, teacher) == [("layer2", "block1"), ("layer3", "block2"), ("layer4", "block3")]
    assert stage_pairs(student, teacher, "layer4:block3.layer.0") == [("layer4", "block3.layer.0")]
    with pytest.raises(Exception, match="no module 'nope'"):
        stage_pairs(student, teacher, "nope:block3")


class _RegionNet(nn.Module):
    """Class 1's logit is the mean of feature channel 0, which is non-zero only in the top-left quadrant."""

    def __init__(self):
        super().__init__()
        self.stage = nn.Identity()

    def forward(self, x):
        feature = self.stage(x)
        pooled = feature.mean(dim=(2, 3))
        return torch.stack([pooled[:, 1], pooled[:, 0]], dim=1)


def test_grad_cam_lights_up_where_the_class_evidence_is():
    net = _RegionNet()
    recorder = StageRecorder(net, ["stage"])
    x = torch.zeros(2, 2, 8, 8)
    x[:, 0, :4, :4] = 1.0  # class-1 evidence, top-left
    x[:, 1, 4:, 4:] = 1.0  # class-0 evidence, bottom-right
    x.requires_grad_(True)
    logits = net(x)
    (cam1,) = grad_cam(logits, recorder.features(), torch.tensor([1, 1]), create_graph=False)
    assert cam1[:, :4, :4].min() > 0 and cam1[:, 4:, :].abs().sum() == 0 and cam1[:, :, 4:].abs().sum() == 0
    assert torch.allclose(cam1.flatten(1).norm(dim=1), torch.ones(2))
    (cam0,) = grad_cam(net(x), recorder.features(), torch.tensor([0, 0]), create_graph=False)
    assert cam0[:, 4:, 4:].min() > 0 and cam0[:, :4, :].abs().sum() == 0


def test_alignment_is_zero_for_the_teacher_itself_and_training_on_it_lowers_it():
    torch.manual_seed(0)
    teacher = zoo.Classifier(zoo.build_model("resnet8", 10, 3).eval(), (0.5,) * 3, (0.25,) * 3)
    same = copy.deepcopy(teacher).eval()
    images = torch.rand(8, 3, 32, 32)
    objective = MSARCKD(same, teacher, temperature=4.0, weight=1.0)
    with autocast(torch.device("cpu"), True):  # as the loop runs the student: at the default --precision
        logits = same(images)
    objective(logits.float(), _Batch(images))
    assert objective.last_msarc == pytest.approx(0.0, abs=1e-10)

    student = zoo.Classifier(zoo.build_model("resnet8", 10, 3), (0.5,) * 3, (0.25,) * 3).eval()
    objective = MSARCKD(student, teacher, temperature=4.0, weight=1.0)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    values = []
    for _ in range(8):
        logits = student(images).float()
        teacher_logits = teacher(images).float()
        classes = teacher_logits.argmax(1)
        x = images.clone().requires_grad_(True)
        t_maps = grad_cam(teacher(x), objective.teacher_stages.features(), classes, create_graph=False)
        s_maps = grad_cam(logits, objective.student_stages.features(), classes, create_graph=True)
        loss = cam_alignment_loss(s_maps, [m.detach() for m in t_maps])
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
        optimizer.step()
        values.append(float(loss.detach()))
    assert values[0] > 0 and values[-1] < values[0], values


class _Batch:
    def __init__(self, images):
        self.images = images


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_the_msarc_term_enters_the_loss_and_the_gradient_with_its_weight(weight):
    """The objective's value is KD + weight * L_mSARC, and the student's gradient is not KD's alone."""
    from distill.objectives import kd_loss

    torch.manual_seed(0)
    teacher = zoo.Classifier(zoo.build_model("resnet8", 10, 3).eval(), (0.5,) * 3, (0.25,) * 3)
    student = zoo.Classifier(zoo.build_model("resnet8", 10, 3), (0.5,) * 3, (0.25,) * 3).eval()
    images = torch.rand(8, 3, 32, 32)
    objective = MSARCKD(student, teacher, temperature=4.0, weight=weight, amp=False)
    logits = student(images).float()
    loss = objective(logits, _Batch(images))
    with torch.no_grad():
        kd = kd_loss(logits, teacher(images).float(), 4.0)
    assert objective.last_msarc > 0
    assert loss.item() == pytest.approx(kd.item() + weight * objective.last_msarc, rel=1e-5)
    params = [p for p in student.parameters() if p.requires_grad]
    with_msarc = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    kd_only = torch.autograd.grad(kd_loss(logits, teacher(images).float().detach(), 4.0), params, allow_unused=True)
    assert any(a is not None and (b is None or not torch.allclose(a, b)) for a, b in zip(with_msarc, kd_only,
                                                                                         strict=True))


def test_distill_run_with_msarc(tmp_path: Path):
    torch.manual_seed(0)
    teacher = zoo.Classifier(zoo.build_model("resnet8", 10, 3), (0.5,) * 3, (0.25,) * 3)
    teacher_path = tmp_path / "teacher.pt"
    zoo.save_classifier(teacher, teacher_path, arch="resnet8", input_size=32, test_accuracy=0.5)
    images = np.random.default_rng(0).integers(0, 256, size=(32, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        logits = teacher(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    writer = shards.ShardWriter.open(tmp_path / "ds", identity={"method": "test"},
                                     header={"teacher": teacher.card.to_dict()}, target_samples=32, shard_size=32)
    writer.commit_shard([shards.Sample(f"{i:09d}", images[i], int(logits[i].argmax()),
                                       logits[i].astype(np.float16), {}) for i in range(32)])
    writer.finish({})
    base = ["run", "--shards", str(tmp_path / "ds"), "--student", "resnet8", "--batch-size", "16", "--epochs", "1",
            "--workers", "0", "--quiet", "--eval-data", "none", "--msarc-weight", "0.5"]
    refused = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 1 and "needs the teacher" in refused.output
    result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "b"), "--teacher", str(teacher_path)])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "b" / "metrics.json").read_text())["config"]
    assert config["objective"] == "kd-live-teacher+msarc" and config["msarc_weight"] == 0.5
    assert config["msarc_stages"] == [["layer1", "layer1"], ["layer2", "layer2"], ["layer3", "layer3"]]

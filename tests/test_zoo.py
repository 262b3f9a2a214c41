"""Tests for the model zoo: public parameter names, architectures, cards, classifiers, devices."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from zookit import MEAN3, STD3, random_state

import zoo
from zoo.card import card_path_for


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def expected_wrn_keys(depth: int, widen: int) -> set[str]:
    """Keys of ZSKT's / RepDistiller's ``WideResNet(depth, widen)``, written out from its block structure."""
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    keys = ["conv1.weight"]
    for stage in range(3):
        for i in range(n):
            p = f"block{stage + 1}.layer.{i}"
            keys += _bn(f"{p}.bn1") + [f"{p}.conv1.weight"] + _bn(f"{p}.bn2") + [f"{p}.conv2.weight"]
            in_planes = widths[stage] if i == 0 else widths[stage + 1]
            if in_planes != widths[stage + 1]:
                keys.append(f"{p}.convShortcut.weight")
    keys += _bn("bn1") + ["fc.weight", "fc.bias"]
    return set(keys)


def expected_cifar_resnet_keys(blocks: tuple[int, ...]) -> set[str]:
    """Keys of DAFL's / Fast-Datafree's CIFAR ``ResNet(BasicBlock, blocks)``."""
    keys = ["conv1.weight"] + _bn("bn1")
    in_planes = 64
    for stage, (planes, count, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2), strict=True)):
        for i in range(count):
            p = f"layer{stage + 1}.{i}"
            keys += [f"{p}.conv1.weight"] + _bn(f"{p}.bn1") + [f"{p}.conv2.weight"] + _bn(f"{p}.bn2")
            if (stride if i == 0 else 1) != 1 or in_planes != planes:
                keys += [f"{p}.shortcut.0.weight"] + _bn(f"{p}.shortcut.1")
            in_planes = planes
    keys += ["linear.weight", "linear.bias"]
    return set(keys)



# --- public parameter names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, expected",
    [("wrn16_2", expected_wrn_keys(16, 2)), ("resnet34", expected_cifar_resnet_keys((3, 4, 6, 3)))],
)
def test_public_key_names_and_wrapped_checkpoint_round_trip(tmp_path, arch, expected):
    model = zoo.build_model(arch, num_classes=10, in_channels=3)
    assert set(model.state_dict()) == expected

    source = zoo.build_model(arch, num_classes=10, in_channels=3)
    source.load_state_dict(random_state(source, seed=1))
    source.eval()
    path = tmp_path / f"{arch}.pth"
    # The Fast-Datafree / CMI layout: weights under "state_dict", saved from DataParallel.
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}, "best_acc": 0.9}, path)

    clf = zoo.load_classifier(path, arch=arch, mean=MEAN3, std=STD3)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected_logits = source((x - torch.tensor(MEAN3).view(1, 3, 1, 1)) / torch.tensor(STD3).view(1, 3, 1, 1))
        got = clf(x)
    torch.testing.assert_close(got, expected_logits, rtol=0, atol=0)
    assert clf.card.arch == arch and clf.num_classes == 10 and clf.input_shape == (3, 32, 32)


def test_other_families_use_public_names():
    resnet8 = set(zoo.build_model("resnet8").state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight"} <= resnet8
    assert "layer2.0.downsample.1.running_mean" in resnet8 and "fc.weight" in resnet8
    assert not any(k.startswith("layer1.0.downsample") for k in resnet8)  # 16 -> 16 needs no projection
    assert "layer1.0.downsample.0.weight" in zoo.build_model("resnet8x4").state_dict()  # 32 -> 64 does

    vgg8 = set(zoo.build_model("vgg8").state_dict())
    assert {"block0.0.weight", "block0.0.bias", "block0.1.running_mean", "block4.1.weight", "classifier.weight"} <= vgg8
    assert "block0.3.weight" in zoo.build_model("vgg13").state_dict()
    assert "block2.3.weight" in zoo.build_model("vgg11").state_dict()

    mobile = set(zoo.build_model("mobilenetv2").state_dict())
    for key in (
        "conv1.0.weight",
        "conv1.1.bias",
        "blocks.0.0.conv.0.weight",
        "blocks.0.0.conv.7.running_var",
        "blocks.6.0.conv.6.weight",
        "conv2.0.weight",
        "conv2.1.weight",
        "classifier.0.weight",
    ):
        assert key in mobile

    lenet = set(zoo.build_model("lenet5", in_channels=1).state_dict())
    assert lenet == {f"{m}.{p}" for m in ("conv1", "conv2", "conv3", "fc1", "fc2") for p in ("weight", "bias")}


# --- every registry architecture ----------------------------------------------------------------------

REGISTRY = [
    "resnet8",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet18",
    "resnet34",
    "wrn16_1",
    "wrn16_2",
    "wrn40_1",
    "wrn40_2",
    "vgg8",
    "vgg11",
    "vgg13",
    "mobilenetv2",
    "lenet5",
]


def test_registry_names():
    assert set(REGISTRY) <= set(zoo.ARCHITECTURES)
    assert "wrn-16-2" in zoo.ARCHITECTURES and "ResNet-34" in zoo.ARCHITECTURES
    assert zoo.ARCHITECTURES["WRN-40-2"] is zoo.ARCHITECTURES["wrn40_2"]
    assert zoo.canonical_arch("resnet-34") == "resnet34"
    assert type(zoo.build_model("WRN-16-2")).__name__ == "WideResNet"


@pytest.mark.parametrize("arch", sorted(zoo.ARCHITECTURES))
def test_every_arch_builds_and_exposes_features(arch):
    for in_channels, num_classes in ((1, 10), (3, 100), (3, 10), (1, 100)):
        model = zoo.build_model(arch, num_classes=num_classes, in_channels=in_channels).eval()
        first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        assert first_conv.in_channels == in_channels and last_linear.out_features == num_classes
        if (in_channels, num_classes) not in ((1, 10), (3, 100)):
            continue  # these two forward passes already cover both channel counts and both class counts
        fed: dict[str, torch.Tensor] = {}
        handle = last_linear.register_forward_pre_hook(lambda m, inputs, fed=fed: fed.update(x=inputs[0]))
        with torch.no_grad():
            logits, features = model(torch.rand(2, in_channels, 32, 32), return_features=True)
        handle.remove()
        assert logits.shape == (2, num_classes)
        assert features.shape == (2, last_linear.in_features) == (2, model.feature_dim)
        torch.testing.assert_close(features, fed["x"])  # features are exactly what the final Linear sees


# --- errors -------------------------------------------------------------------------------------------


def test_unknown_arch_lists_suggestions():
    with pytest.raises(zoo.ZooError) as info:
        zoo.build_model("wrn16-3")
    message = str(info.value)
    assert "Did you mean" in message and "wrn16_2" in message and "resnet34" in message
    with pytest.raises(zoo.ZooError, match="tv:resnet50"):
        zoo.build_model("tv:resnet51")



# --- cards --------------------------------------------------------------------------------------------


def test_card_round_trip_and_validation(tmp_path):
    card = zoo.TeacherCard(
        arch="wrn16_2",
        num_classes=3,
        mean=MEAN3,
        std=STD3,
        class_names=["a", "b", "c"],
        test_accuracy=0.9,
        dataset="fmnist32",
        command="train --x",
    )
    assert zoo.TeacherCard.from_dict(card.to_dict()) == card
    path = card.save(tmp_path / "c.card.json")
    assert zoo.TeacherCard.load(path) == card
    assert json.loads(path.read_text())["mean"] == list(MEAN3)

    default = zoo.TeacherCard(arch="resnet8", num_classes=4, in_channels=1)
    assert default.class_names == ["0", "1", "2", "3"] and default.mean == (0.5,) and default.sha256 == ""
    with pytest.raises(zoo.ZooError, match="colour"):
        zoo.TeacherCard.from_dict({"arch": "resnet8", "num_classes": 10, "colour": "red"})
    with pytest.raises(zoo.ZooError, match="class names"):
        zoo.TeacherCard(arch="resnet8", num_classes=3, class_names=["a"])
    assert card_path_for(tmp_path / "X.pt") == tmp_path / "X.card.json"




# --- classifier ---------------------------------------------------------------------------------------


def test_classifier_features_and_batchnorm():
    clf = zoo.Classifier(zoo.build_model("wrn16_1", in_channels=1), [0.5], [0.5])
    logits, features = clf.forward_with_features(torch.rand(2, 1, 32, 32))
    assert logits.shape == (2, 10) and features.shape == (2, 64) and clf.feature_dim == 64
    assert clf.has_batchnorm() and not zoo.Classifier(zoo.build_model("lenet5"), MEAN3, STD3).has_batchnorm()
    assert "mean" not in clf.state_dict()  # normalisation lives in the card, not among the weights


def test_torchvision_features_hook():
    clf = zoo.Classifier(zoo.build_model("tv:resnet18", num_classes=10), MEAN3, STD3).eval()
    with torch.no_grad():
        logits, features = clf.forward_with_features(torch.rand(1, 3, 64, 64))
    assert logits.shape == (1, 10) and features.shape == (1, 512)
    assert zoo.build_model("tv:resnet18", in_channels=1).conv1.in_channels == 1


# --- device and default teacher -----------------------------------------------------------------------


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert zoo.pick_device("auto") == torch.device("cpu") == zoo.pick_device(None)
    assert zoo.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(zoo.ZooError, match="CUDA is not available"):
        zoo.pick_device("cuda")
    with pytest.raises(zoo.ZooError, match="unknown device"):
        zoo.pick_device("gpu-please")

"""Tests for the model zoo: public parameter names, checkpoint loading, cards, classifiers, devices."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from torch import nn

import zoo
from zoo.card import card_path_for
from zoo.errors import NormalizationWarning

MEAN3 = (0.4914, 0.4822, 0.4465)
STD3 = (0.2470, 0.2435, 0.2616)


class PickledCode:
    """A custom class: unpickling it needs arbitrary code, so checkpoints holding it must be refused."""

    def __init__(self) -> None:
        self.value = 1


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


def random_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the model's names and shapes (positive running variances)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=gen) * 0.1
    return state


def saved_model(tmp_path, arch: str, num_classes: int = 10, in_channels: int = 3, name: str = "t.pt", wrap=None):
    model = zoo.build_model(arch, num_classes, in_channels)
    model.load_state_dict(random_state(model))
    model.eval()
    state = model.state_dict()
    path = tmp_path / name
    torch.save(wrap(state) if wrap else state, path)
    return model, path


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


def test_key_mismatch_names_missing_and_unexpected_keys(tmp_path):
    _, path = saved_model(tmp_path, "wrn16_2")
    with pytest.raises(zoo.ZooError) as info:
        zoo.load_classifier(path, arch="wrn16_1", mean=MEAN3, std=STD3)
    message = str(info.value)
    assert "wrn16_1" in message and "unexpected keys" in message
    assert "block1.layer.0.convShortcut.weight" in message
    assert "match this checkpoint: wrn16_2" in message

    _, path8 = saved_model(tmp_path, "resnet8", name="r8.pt")
    with pytest.raises(zoo.ZooError) as info:
        zoo.load_classifier(path8, arch="resnet20", mean=MEAN3, std=STD3)
    assert "missing keys: layer1.1." in str(info.value) and "resnet8" in str(info.value)


def test_no_arch_and_no_card_is_an_error_that_suggests(tmp_path):
    _, path = saved_model(tmp_path, "wrn40_1")
    with pytest.raises(zoo.ZooError) as info:
        zoo.load_classifier(path)
    message = str(info.value)
    assert "--arch" in message and "card" in message and "keys match: wrn40_1" in message


def test_class_count_mismatch(tmp_path):
    _, path = saved_model(tmp_path, "resnet8", num_classes=10)
    with pytest.raises(zoo.ZooError, match="checkpoint has 10 classes, you said 100"):
        zoo.load_classifier(path, arch="resnet8", num_classes=100, mean=MEAN3, std=STD3)
    zoo.TeacherCard(arch="resnet8", num_classes=100).save(card_path_for(path))
    with pytest.raises(zoo.ZooError, match="checkpoint has 10 classes, its card t.card.json says 100"):
        zoo.load_classifier(path, mean=MEAN3, std=STD3)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save(PickledCode(), path)
    with pytest.raises(zoo.ZooError, match="refused") as info:
        zoo.load_classifier(path, arch="resnet8")
    assert "PickledCode" in str(info.value)

    model = zoo.build_model("resnet8")
    torch.save({"state_dict": model.state_dict(), "config": PickledCode()}, tmp_path / "mixed.pt")
    with pytest.raises(zoo.ZooError, match="pickled Python objects"):
        zoo.load_classifier(tmp_path / "mixed.pt", arch="resnet8")


def test_unreadable_or_foreign_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(zoo.ZooError, match="cannot read checkpoint"):
        zoo.load_classifier(tmp_path / "junk.pt", arch="resnet8")
    torch.save({"weights": {"a": torch.zeros(1)}, "epoch": 3}, tmp_path / "odd.pt")
    with pytest.raises(zoo.ZooError, match="no state_dict"):
        zoo.load_classifier(tmp_path / "odd.pt", arch="resnet8")
    with pytest.raises(zoo.ZooError, match="no checkpoint file"):
        zoo.load_classifier(tmp_path / "absent.pt", arch="resnet8")


# --- checkpoint layouts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        None,  # plain state_dict
        lambda sd: {"model": sd, "epoch": 240, "best_acc": torch.tensor(0.77)},  # RepDistiller
        lambda sd: {"net": {"module." + k: v for k, v in sd.items()}},
        lambda sd: {"state_dict": {"_orig_mod." + k: v for k, v in sd.items()}, "optimizer": {"lr": 0.1}},
    ],
)
def test_checkpoint_layouts_and_inferred_shapes(tmp_path, wrap):
    model, path = saved_model(tmp_path, "wrn16_1", num_classes=7, in_channels=1, wrap=wrap)
    clf = zoo.load_classifier(path, arch="wrn-16-1", mean=[0.5], std=[0.25])
    assert clf.num_classes == 7 and clf.input_shape == (1, 32, 32) and clf.card.in_channels == 1
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), model((x - 0.5) / 0.25))


def test_torchscript_round_trip(tmp_path):
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(net)
        scripted.save(str(tmp_path / "scripted.pt"))
    clf = zoo.load_classifier(tmp_path / "scripted.pt", mean=MEAN3, std=STD3)
    reference = zoo.Classifier(net, MEAN3, STD3)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), reference(x))
    assert clf.num_classes == 5 and clf.card.arch == "torchscript" and clf.has_batchnorm()
    with pytest.raises(zoo.ZooError, match="this teacher is TorchScript"):
        clf.features(x)
    card = zoo.save_classifier(clf, tmp_path / "again.pt")
    again = zoo.load_classifier(tmp_path / "again.pt")
    assert card.sha256 == again.card.sha256
    with torch.no_grad():
        torch.testing.assert_close(again(x), reference(x))


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


def test_card_beside_checkpoint_and_override_precedence(tmp_path):
    _, path = saved_model(tmp_path, "resnet8")
    zoo.TeacherCard(
        arch="resnet8",
        num_classes=10,
        input_size=28,
        mean=MEAN3,
        std=STD3,
        class_names=[f"c{i}" for i in range(10)],
        dataset="cifar10",
    ).save(card_path_for(path))
    from_card = zoo.load_classifier(path)
    assert from_card.card.mean == MEAN3 and from_card.card.input_size == 28 and from_card.card.dataset == "cifar10"
    assert from_card.normalization_source == "card" and from_card.card.class_names[3] == "c3"
    assert from_card.card.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()

    overridden = zoo.load_classifier(path, mean=(0.5, 0.5, 0.5), input_size=32, class_names=list("abcdefghij"))
    assert overridden.card.mean == (0.5, 0.5, 0.5) and overridden.card.std == STD3  # std still from the card
    assert overridden.card.input_size == 32 and overridden.card.class_names[0] == "a"
    assert overridden.normalization_source == "given"


def test_missing_normalisation_warns(tmp_path):
    _, path = saved_model(tmp_path, "resnet8")
    with pytest.warns(NormalizationWarning, match="mean or std"):
        clf = zoo.load_classifier(path, arch="resnet8")
    assert clf.normalization_source == "default" and clf.card.mean == (0.5, 0.5, 0.5)


def test_save_classifier_writes_weights_and_card_atomically(tmp_path):
    network = zoo.build_model("resnet8", num_classes=10)
    clf = zoo.Classifier(network, MEAN3, STD3)
    assert clf.card.arch == "resnet8"
    out = tmp_path / "sub" / "teacher.pt"
    card = zoo.save_classifier(clf, out, test_accuracy=0.5, dataset="fmnist32")
    assert sorted(p.name for p in out.parent.iterdir()) == ["teacher.card.json", "teacher.pt"]
    assert card.sha256 == hashlib.sha256(out.read_bytes()).hexdigest() and clf.card == card
    loaded = zoo.load_classifier(out)
    assert loaded.card == card
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), clf.eval()(x))
    with pytest.raises(zoo.ZooError, match="mean"):
        zoo.save_classifier(clf, out, mean=(0.1, 0.1, 0.1))
    with pytest.raises(zoo.ZooError, match="unknown"):
        zoo.save_classifier(clf, out, accuracy=0.3)


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


def test_default_teacher(monkeypatch, tmp_path):
    assert zoo.default_teacher_path().name == "wrn16_2_fmnist32.pt"
    assert zoo.default_teacher_path().parent.name == "teachers"
    monkeypatch.setattr("zoo.loading._DEFAULT_TEACHER", tmp_path / "missing.pt")
    with pytest.raises(zoo.ZooError, match="default teacher"):
        zoo.load_default_teacher()

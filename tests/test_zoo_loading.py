"""Tests for checkpoint loading (zoo/loading.py, zoo/keymap.py): foreign layouts and key names, refusals,
TorchScript, cards beside checkpoints, atomic saving, the default teacher."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch
from torch import nn
from zookit import MEAN3, STD3, saved_model

import zoo
from zoo.card import card_path_for
from zoo.errors import NormalizationWarning


class PickledCode:
    """A custom class: unpickling it needs arbitrary code, so checkpoints holding it must be refused."""

    def __init__(self) -> None:
        self.value = 1


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
    with pytest.raises(zoo.ZooError, match="--trust-torchscript"):
        zoo.load_classifier(tmp_path / "scripted.pt", mean=MEAN3, std=STD3)
    with pytest.warns(UserWarning, match="runs code"):
        clf = zoo.load_classifier(tmp_path / "scripted.pt", mean=MEAN3, std=STD3, trust_torchscript=True)
    reference = zoo.Classifier(net, MEAN3, STD3)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), reference(x))
    assert clf.num_classes == 5 and clf.card.arch == "torchscript" and clf.has_batchnorm()
    with pytest.raises(zoo.ZooError, match="this teacher is TorchScript"):
        clf.features(x)
    card = zoo.save_classifier(clf, tmp_path / "again.pt")
    with pytest.warns(UserWarning, match="runs code"):
        again = zoo.load_classifier(tmp_path / "again.pt", trust_torchscript=True)
    assert card.sha256 == again.card.sha256
    with torch.no_grad():
        torch.testing.assert_close(again(x), reference(x))



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



def test_default_teacher(monkeypatch, tmp_path):
    assert zoo.default_teacher_path().name == "wrn16_2_fmnist32.pt"
    assert zoo.default_teacher_path().parent.name == "teachers"
    monkeypatch.setattr("zoo.loading._DEFAULT_TEACHER", tmp_path / "missing.pt")
    with pytest.raises(zoo.ZooError, match="default teacher"):
        zoo.load_default_teacher()

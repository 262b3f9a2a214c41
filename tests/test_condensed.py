"""Condensed-data-guided inversion (synth/plugins/condensed.py): the discriminator's L_FA pulls the generator's
features toward the condensed ones, every host runs it through the plug-in protocol, runs without it are
unchanged byte for byte, condensed samples travel into the shards, and bad input is refused before any file
is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import NoArtifacts
from PIL import Image
from torch import nn

import shards
import zoo
from synth.commands.cli import main
from synth.commands.run import _build_plugins
from synth.core import registry
from synth.methods.gmi import GMI, GMIConfig
from synth.plugins.condensed.data import CondensedDataError, load_condensed
from synth.plugins.condensed.plugin import CondensedGuidance, CondensedOptions

TINY = ["--batch-size", "10", "--inversion-steps", "2", "--kd-steps", "1", "--proxy-student", "resnet8",
        "--latent-dim", "16", "--generator-width", "8", "--memory-capacity", "64", "--device", "cpu",
        "--quiet", "--preset", "paper"]
EXTRA = {"d2cip": ["--prior-iterations", "2", "--bank-size", "16"],
         "kgen": ["--class-embedding", "centre", "--batch-sizes", "10,10"]}  # 28x28 and 32x32 batches
HOSTS = ["gmi", "fast", "cmi", "d2cip", "cpsc", "kgen"]


def smooth_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """n smooth colour images (uint8 N×H×W×3): upsampled 4×4 noise, easy to tell apart."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(coarse, size=size, mode="bilinear") * 255).round().byte().permute(0, 2, 3, 1).numpy()


@pytest.fixture
def condensed_npz(tmp_path) -> Path:
    path = tmp_path / "condensed.npz"
    np.savez(path, images=smooth_images(20, seed=1), labels=np.repeat(np.arange(10), 2))
    return path


def _run(out: Path, teacher: Path, method: str, *extra: str):
    return CliRunner().invoke(main, ["run", method, "--out", str(out), "--teacher", str(teacher), "--num-images",
                                     "20", "--shard-size", "10", *TINY, *EXTRA.get(method, []), *extra])


def _digests(out: Path) -> list[str]:
    return [entry["sha256"] for entry in json.loads((out / "manifest.json").read_text())["shards"]]


# -- the discriminator guides the generator ---------------------------------------------------------------


def test_feature_alignment_moves_the_generators_features_toward_the_condensed_ones(tmp_path):
    # Toy case: the teacher's penultimate feature is an image's mean colour, each class's condensed images one
    # colour; only L_FA drives the generator (every host term weighted 0).
    torch.manual_seed(0)
    network = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    teacher = zoo.Classifier(network, (0.5,) * 3, (0.25,) * 3)
    colours = torch.rand(10, 3, generator=torch.Generator().manual_seed(3)) * 0.8 + 0.1
    images = (colours.repeat_interleave(2, 0)[:, None, None, :] * 255).round().byte().expand(20, 32, 32, 3)
    np.savez(tmp_path / "colours.npz", images=images.numpy(), labels=np.repeat(np.arange(10), 2))

    def class_distance(images: torch.Tensor, labels: torch.Tensor, plugin: CondensedGuidance) -> float:
        with torch.no_grad():
            fake, real = teacher.features(images), teacher.features(plugin.images)
        return float(sum((fake[labels == c].mean(0) - real[plugin.labels == c].mean(0)).norm() for c in range(10)))

    results = {}
    for lr in (3e-3, 0.0):  # 0.0: a control whose generator and latents do not move
        torch.manual_seed(1)
        plugin = CondensedGuidance(CondensedOptions(condensed=str(tmp_path / "colours.npz"), discriminator_lr=1e-2))
        config = GMIConfig(batch_size=10, inversion_steps=50, class_weight=0, bn_weight=0, adv_weight=0, kd_steps=0,
                           proxy_student="resnet8", latent_dim=16, generator_width=8, generator_lr=lr, latent_lr=lr,
                           augment_views=False)
        host = GMI(teacher, config, torch.device("cpu"), plugins=[plugin])
        labels = host.next_labels()
        torch.manual_seed(2)
        host.begin_batch(labels)  # the latents the batch starts from, as invert_batch draws them below
        with torch.no_grad():
            before = class_distance(host.generator(host.latents), labels, plugin)
        torch.manual_seed(2)
        discriminator = [p.detach().clone() for p in plugin.discriminator.parameters()]
        after = class_distance(host.invert_batch(labels), labels, plugin)
        assert set(host.losses_of_last_step()) == {"fa"}
        assert any(not torch.equal(a, b) for a, b in zip(discriminator, plugin.discriminator.parameters(),
                                                         strict=True))
        results[lr] = (before, after)
    before, after = results[3e-3]
    assert after < 0.85 * before, results
    assert results[0.0][1] == pytest.approx(results[0.0][0], rel=1e-5)  # the fall is L_FA's doing


@pytest.mark.parametrize("unconditional", [False, True])
def test_discriminator_is_conditional_unless_the_ablation_asks(tiny_teacher, condensed_npz, unconditional):
    teacher = zoo.load_classifier(tiny_teacher)
    options = CondensedOptions(condensed=str(condensed_npz), unconditional_discriminator=unconditional)
    plugin = CondensedGuidance(options)
    GMI(teacher, GMIConfig(batch_size=10, proxy_student="resnet8", latent_dim=16, generator_width=8),
        torch.device("cpu"), plugins=[plugin])
    features = torch.randn(4, teacher.features(torch.zeros(1, 3, 32, 32)).shape[1])
    plugin.discriminator.eval()  # spectral norm: no power iteration between the two calls
    scores = [plugin.discriminator(features, torch.full((4,), c)) for c in (0, 1)]
    assert torch.equal(scores[0], scores[1]) == unconditional


# -- every host, and byte-identical runs without it ---------------------------------------------------------


@pytest.mark.parametrize("method", HOSTS)
def test_every_host_takes_the_plugin_and_runs_without_it_are_byte_identical(tmp_path, tiny_teacher, condensed_npz,
                                                                             monkeypatch, method):
    # Before the plug-in existed: the registry without it.
    with monkeypatch.context() as patch:
        patch.setattr(registry, "PLUGINS", {k: v for k, v in registry.all_plugins().items() if k != "condensed"})
        assert _run(tmp_path / "before", tiny_teacher, method).exit_code == 0
        assert "--condensed" not in CliRunner().invoke(main, ["run", method, "--help"]).output
    assert "--condensed" in CliRunner().invoke(main, ["run", method, "--help"]).output
    assert _run(tmp_path / "after", tiny_teacher, method).exit_code == 0
    assert _digests(tmp_path / "after") == _digests(tmp_path / "before")
    before = json.loads((tmp_path / "before" / "manifest.json").read_text())
    after = json.loads((tmp_path / "after" / "manifest.json").read_text())
    assert after["identity"] == before["identity"] and "plugins" not in after["method"]

    guided = _run(tmp_path / "guided", tiny_teacher, method, "--condensed", str(condensed_npz))
    assert guided.exit_code == 0, guided.output
    manifest = json.loads((tmp_path / "guided" / "manifest.json").read_text())
    assert manifest["source_counts"] == {"condensed": 20, "synthetic": 20}
    assert manifest["identity"]["plugins"]["condensed"]["condensed"] == str(condensed_npz)
    assert shards.verify(tmp_path / "guided") == []


@pytest.mark.parametrize("method", HOSTS)
def test_without_condensed_the_loss_dictionary_is_unchanged(tiny_teacher, method):
    defaults = {f: None for f in CondensedOptions.__dataclass_fields__}
    assert _build_plugins({}, {"condensed": defaults}) == []  # what `synth run` builds without --condensed
    teacher = zoo.load_classifier(tiny_teacher)
    cls = registry.get_method(method)
    values = dict(batch_size=10, inversion_steps=2, kd_steps=1, proxy_student="resnet8", latent_dim=16,
                  generator_width=8, memory_capacity=64)
    if method == "d2cip":
        values.update(prior_iterations=2, bank_size=16)
    if method == "kgen":
        values.update(class_embedding="centre", batch_sizes="10,10")
    losses = []
    for plugins in ([], _build_plugins({}, {"condensed": defaults})):
        torch.manual_seed(0)
        host = cls(teacher, cls.config_class(**values), torch.device("cpu"), plugins=plugins)
        host.prepare(NoArtifacts())
        batches = host.synthesize()
        next(batches), next(batches)
        losses.append(host.losses_of_last_step())
    assert losses[0] == losses[1] and "fa" not in losses[0]


# -- condensed samples in the shards ------------------------------------------------------------------------


def test_condensed_samples_are_stored_first_with_their_source_and_teacher_logits(tmp_path, tiny_teacher,
                                                                                  condensed_npz):
    out = tmp_path / "set"
    assert _run(out, tiny_teacher, "gmi", "--condensed", str(condensed_npz), "--fa-weight", "0").exit_code == 0
    arrays = shards.load_arrays(out, progress=False)
    sources = [m["source"] for m in arrays.meta]
    assert sources == ["condensed"] * 20 + ["synthetic"] * 20
    with np.load(condensed_npz) as data:
        assert np.array_equal(arrays.images[:20], data["images"])
        assert np.array_equal(arrays.labels[:20], data["labels"])
    teacher = zoo.load_classifier(tiny_teacher)
    with torch.no_grad():
        logits = teacher(torch.from_numpy(arrays.images[:20]).permute(0, 3, 1, 2).float() / 255)
    assert np.allclose(arrays.logits[:20].astype(np.float32), logits.numpy(), atol=2e-2)


def test_plugin_state_round_trips_and_condensed_samples_are_not_stored_twice(tiny_teacher, condensed_npz):
    teacher = zoo.load_classifier(tiny_teacher)
    config = GMIConfig(batch_size=10, inversion_steps=2, kd_steps=1, proxy_student="resnet8", latent_dim=16,
                       generator_width=8)
    plugin = CondensedGuidance(CondensedOptions(condensed=str(condensed_npz)))
    host = GMI(teacher, config, torch.device("cpu"), plugins=[plugin])
    batches = host.synthesize()
    assert next(batches).source == "condensed" and next(batches).source == "synthetic"
    fresh = CondensedGuidance(CondensedOptions(condensed=str(condensed_npz)))
    again = GMI(teacher, config, torch.device("cpu"), plugins=[fresh])
    again.load_state_dict(host.state_dict())
    for a, b in zip(fresh.discriminator.parameters(), plugin.discriminator.parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh.emitted and next(again.synthesize()).source == "synthetic"


# -- input layouts and bad input ----------------------------------------------------------------------------


def _folders(root: Path, per_class: int = 1, size: int = 32, mode: str = "RGB", classes: int = 10) -> Path:
    images = smooth_images(per_class * classes, seed=2, size=size)
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            image = Image.fromarray(images[c * per_class + i])
            image.convert(mode).save(root / str(c) / f"{i}.png")
    return root


def test_the_three_layouts_are_accepted(tmp_path, tiny_teacher, condensed_npz):
    shape = (3, 32, 32)
    folder = load_condensed(_folders(tmp_path / "f", per_class=2), num_classes=10, shape=shape)
    assert len(folder) == 20 and folder.per_class(10) == [2] * 10
    named = _folders(tmp_path / "n")
    for c in range(10):
        (named / str(c)).rename(named / f"class{c}")
    assert len(load_condensed(named, num_classes=10, shape=shape, class_names=[f"class{c}" for c in range(10)])) == 10
    npz = load_condensed(condensed_npz, num_classes=10, shape=shape)
    out = tmp_path / "set"
    assert _run(out, tiny_teacher, "gmi", "--condensed", str(condensed_npz), "--fa-weight", "0").exit_code == 0
    dataset = load_condensed(out, num_classes=10, shape=shape)
    assert len(dataset) == 40 and np.array_equal(dataset.images[:20], npz.images)
    np.savez(tmp_path / "small.npz", images=smooth_images(10, seed=3, size=28)[..., :1], labels=np.arange(10))
    resized = load_condensed(tmp_path / "small.npz", num_classes=10, shape=shape, resize=True)
    assert resized.images.shape == (10, 32, 32, 3)


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, list[str], str]]:
    def npz(name: str, images: np.ndarray, labels: np.ndarray) -> Path:
        np.savez(tmp / name, images=images, labels=labels)
        return tmp / name

    empty = _folders(tmp / "empty")
    for file in (empty / "3").iterdir():
        file.unlink()
    unreadable = _folders(tmp / "unreadable")
    (unreadable / "4" / "0.png").write_bytes(b"not a png")
    bogus = _folders(tmp / "bogus")
    (bogus / "9").rename(bogus / "zebra")
    broken = tmp / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not a zip")
    return {
        "unknown class label": (npz("c11.npz", smooth_images(11, 4), np.arange(11)), [], "teacher does not have"),
        "unknown class folder": (bogus, [], "zebra name classes the teacher does not have"),
        "wrong size": (npz("s28.npz", smooth_images(10, 4, size=28), np.arange(10)), [], "--condensed-resize"),
        "wrong channels": (_folders(tmp / "grey", mode="L"), [], "1 channel(s), the teacher takes 32x32 with 3"),
        "empty class": (empty, [], "empty class folder"),
        "missing class": (npz("c9.npz", smooth_images(9, 4), np.arange(9)), [], "9 (class9) have no images"),
        "too many": (npz("many.npz", smooth_images(30, 4), np.repeat(np.arange(10), 3)),
                     ["--condensed-max-per-class", "2"], "more than 2 images per class"),
        "unreadable image": (unreadable, [], "unreadable image"),
        "unreadable npz": (broken, [], "unreadable .npz"),
    }


def test_each_bad_input_gets_its_message_and_leaves_nothing_on_disk(tmp_path, tiny_teacher):
    inputs = _bad_inputs(tmp_path)
    for case, (path, extra, message) in inputs.items():
        out = tmp_path / "out" / case.replace(" ", "-")
        result = _run(out, tiny_teacher, "gmi", "--condensed", str(path), *extra)
        assert result.exit_code == 1, (case, result.output)
        assert message in result.output and "Error:" in result.output, (case, result.output)
        assert not out.exists(), case
    with pytest.raises(CondensedDataError, match="no such file"):
        load_condensed(tmp_path / "nothing", num_classes=10, shape=(3, 32, 32))

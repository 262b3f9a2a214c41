"""The condensed plug-in's wiring (issue 20): every host hands ``fa`` to its update, the proxy student replays the
condensed images, the identity holds the set's content hash, a lower-resolution host's discriminator sees one
size, and distribution matching augments real and synthetic images with one parameter set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import NoArtifacts
from test_condensed import HOSTS, smooth_images

import zoo
from synth import runner
from synth.core import augment, registry
from synth.core.pixels import quantise
from synth.plugins.condensed import condense
from synth.plugins.condensed.plugin import CondensedGuidance, CondensedOptions

VALUES = dict(batch_size=10, inversion_steps=2, kd_steps=1, proxy_student="resnet8", latent_dim=16,
              generator_width=8, memory_capacity=64)
EXTRA = {"d2cip": dict(prior_iterations=2, bank_size=16), "kgen": dict(class_embedding="centre", batch_sizes="10,10")}


@pytest.fixture
def condensed_npz(tmp_path):
    path = tmp_path / "condensed.npz"
    np.savez(path, images=smooth_images(20, seed=1), labels=np.repeat(np.arange(10), 2))
    return path


def _host(teacher_path, method: str, npz, **extra):
    torch.manual_seed(0)
    teacher = zoo.load_classifier(teacher_path)
    cls = registry.get_method(method)
    plugin = CondensedGuidance(CondensedOptions(condensed=str(npz)))
    host = cls(teacher, cls.config_class(**{**VALUES, **EXTRA.get(method, {}), **extra}), torch.device("cpu"),
               plugins=[plugin])
    host.prepare(NoArtifacts())
    return host, plugin


@pytest.mark.parametrize("method", HOSTS)
def test_every_host_hands_the_fa_term_to_its_generator_update(tiny_teacher, condensed_npz, method, monkeypatch):
    host, _ = _host(tiny_teacher, method, condensed_npz)
    applied: list[dict[str, frozenset[str]]] = []
    apply = host.engine.apply
    monkeypatch.setattr(host.engine, "apply", lambda terms, groups, optimizers, scaler=None: (
        applied.append({n: t.updates for n, t in terms.items()}), apply(terms, groups, optimizers, scaler))[1])
    stream = host.synthesize()
    assert next(stream).source == "condensed"
    next(stream)
    assert applied and all("fa" in terms for terms in applied)
    assert all(terms["fa"] == frozenset(host.gmi_groups) and "generator" in terms["fa"] for terms in applied)


def test_the_proxy_student_replays_the_condensed_images_with_their_labels(tiny_teacher, condensed_npz):
    host, plugin = _host(tiny_teacher, "gmi", condensed_npz)
    stream = host.synthesize()
    condensed = next(stream)
    synthetic = next(stream)
    rows, labels = host.memory.all(), host.memory.all_labels()
    assert len(rows) == 30  # 20 condensed, then 10 synthetic
    assert torch.equal(rows[:20], quantise(condensed.images)) and torch.equal(labels[:20], plugin.labels)
    assert torch.equal(labels[20:], synthetic.labels)


def test_a_kgen_host_replays_them_at_every_resolution(tiny_teacher, condensed_npz):
    host, _ = _host(tiny_teacher, "kgen", condensed_npz, resolutions="16,24")
    next(host.synthesize())
    assert {size: len(bank) for size, bank in host.memories.items()} == {16: 20, 24: 20}
    assert host.memories[16].all().shape[-2:] == (16, 16)


def test_a_lower_resolution_host_shows_the_discriminator_one_size(tiny_teacher, condensed_npz, monkeypatch):
    host, plugin = _host(tiny_teacher, "kgen-s", condensed_npz, resolutions="24")
    sizes: list[tuple[int, int]] = []
    features = plugin._features
    monkeypatch.setattr(plugin, "_features", lambda x: (sizes.append(tuple(x.shape[-2:])), features(x))[1])
    stream = host.synthesize()
    next(stream), next(stream)
    assert sizes and set(sizes) == {(24, 24)}  # the synthetic side and the resized condensed side


def test_the_identity_holds_the_sets_content_not_only_its_path(tiny_teacher, condensed_npz):
    teacher = zoo.load_classifier(tiny_teacher)
    config = registry.get_method("gmi").config_class(**VALUES)

    def identity():
        plugin = CondensedGuidance(CondensedOptions(condensed=str(condensed_npz)))
        plugin.check(teacher)
        return runner.dataset_identity("gmi", config, 0, teacher, 10, [plugin])

    before = identity()
    assert len(before["plugins"]["condensed"]["condensed_sha256"]) == 64
    assert identity() == before  # the same content: the same identity
    with np.load(condensed_npz) as data:
        images = data["images"].copy()
    images[0, 0, 0, 0] ^= 1  # one pixel of one image
    np.savez(condensed_npz, images=images, labels=np.repeat(np.arange(10), 2))
    assert identity() != before


def test_distribution_matching_augments_both_sides_with_one_parameter_set(monkeypatch):
    calls: list[tuple[int, torch.Tensor]] = []
    original = augment.diff_augment

    def spy(images, **kwargs):
        calls.append((images.shape[0], kwargs.get("params")))
        return original(images, **kwargs)

    monkeypatch.setattr(condense, "diff_augment", spy)
    images = smooth_images(40, seed=3, size=16)
    labels = np.repeat(np.arange(2), 20)
    config = condense.CondenseConfig(ipc=2, iterations=2, real_batch=8, net_width=4)
    condense.distribution_matching(images, labels, 2, config, torch.device("cpu"))
    assert len(calls) == 2 * 2 * 2  # iterations x classes x (real, synthetic)
    for (n_real, real), (n_syn, syn) in zip(calls[::2], calls[1::2], strict=True):
        assert (n_real, n_syn) == (8, 2) and real.shape == (1, 7) and torch.equal(real, syn)
    # One parameter set: the same image gets the same augmentation wherever it sits in either batch.
    x = torch.rand(1, 3, 16, 16)
    params = torch.rand(1, 7)
    out = original(torch.cat([torch.rand(3, 3, 16, 16), x]), params=params)
    torch.testing.assert_close(out[3:], original(x, params=params))

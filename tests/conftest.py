"""Shared fixtures: small teachers the tests build and save themselves (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo


def make_teacher(path: Path, arch: str = "resnet8", num_classes: int = 10, in_channels: int = 3,
                 seed: int = 0, class_names: list[str] | None = None) -> Path:
    """A randomly initialised zoo network saved as a checkpoint with its card; BN statistics are made
    non-trivial so that BN-statistics losses have something to match."""
    torch.manual_seed(seed)
    network = zoo.build_model(arch, num_classes=num_classes, in_channels=in_channels)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    mean, std = (0.5,) * in_channels, (0.25,) * in_channels
    classifier = zoo.Classifier(network, mean, std)
    zoo.save_classifier(classifier, path, arch=arch, num_classes=num_classes, in_channels=in_channels,
                        input_size=32, mean=mean, std=std,
                        class_names=class_names or [f"class{i}" for i in range(num_classes)])
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


@pytest.fixture(scope="session")
def other_teacher(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher2") / "teacher.pt", seed=1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module's tests (they start worker processes of their own), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def calibrated_teacher() -> zoo.Classifier:
    """A random ResNet-8 whose BN statistics are those of a "training set" of smooth random images, so that BN
    matching has a reachable target, as with a real teacher."""
    torch.manual_seed(0)
    network = zoo.build_model("resnet8", 10, 3)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batches
    network.train()
    with torch.no_grad():
        for _ in range(5):
            network((torch.nn.functional.avg_pool2d(torch.rand(64, 3, 32, 32), 5, 1, 2) - 0.5) / 0.25)
    return zoo.Classifier(network.eval(), (0.5,) * 3, (0.25,) * 3)


class NoArtifacts:
    """Stands in for a dataset's artifact store when a test drives a method directly."""

    def path(self, name):
        return None

    def save(self, name, write):
        pass

    def restore_progress(self, restore):
        return None

    def checkpoint(self, state):
        pass


@pytest.fixture
def engine_gradients():
    """``engine_gradients(engine, terms, groups)``: applies the terms with optimisers that only record each
    group's gradients (before any step could change them); returns ``{group: [grad or None, ...]}``."""

    def apply(engine, terms, groups):
        captured = {}

        class Capture(torch.optim.Optimizer):
            def __init__(self, params, name):
                super().__init__(params, {})
                self.name = name

            def step(self, closure=None):
                captured[self.name] = [None if p.grad is None else p.grad.clone()
                                       for g in self.param_groups for p in g["params"]]

        engine.apply(terms, groups, {name: Capture(group.params, name) for name, group in groups.items()})
        return captured

    return apply


@pytest.fixture
def batch_clock(monkeypatch):
    """A manual clock for ``synth run``'s time budget: every batch the runner stores costs ``per_batch`` clock
    seconds (a test sets it), so a budget stops at the same batch on a fast and on a loaded machine."""
    import synth.runner as runner
    from timebudget import ManualClock

    clock = ManualClock()
    clock.per_batch = 0.1
    real = runner.quantise_and_label

    def charged(teacher, images):
        clock.advance(clock.per_batch)
        return real(teacher, images)

    monkeypatch.setattr(runner, "system_clock", clock)
    monkeypatch.setattr(runner, "quantise_and_label", charged)
    return clock


# -- tiny diffusers pipelines (tests/tiny_diffusion.py), one per test module: test_diffdfkd.py rewrites its own ---

@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory) -> Path:
    """A tiny random pixel-space DDPM saved with ``save_pretrained``, loaded back as a user's would be."""
    pytest.importorskip("diffusers")
    from tiny_diffusion import save_ddpm

    return save_ddpm(tmp_path_factory.mktemp("ddpm") / "pipeline")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion pipeline (text encoder, tokenizer, UNet, VAE) saved with ``save_pretrained``."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tiny_diffusion import save_stable_diffusion

    return save_stable_diffusion(tmp_path_factory.mktemp("sd") / "pipeline")

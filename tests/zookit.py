"""Helpers shared by the model-zoo tests (tests/test_zoo*.py): normalisations and checkpoints with random weights."""

from __future__ import annotations

import torch
from torch import nn

import zoo

MEAN3 = (0.4914, 0.4822, 0.4465)
STD3 = (0.2470, 0.2435, 0.2616)


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


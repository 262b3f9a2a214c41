"""torchvision's ImageNet classification models, built by name without weights (``tv:NAME``).

For teachers and students at ImageNet-like resolutions: ``build_torchvision("resnet50", num_classes=100)``
is ``torchvision.models.get_model("resnet50", weights=None, num_classes=100)``. Parameter names are
torchvision's, so checkpoints saved from torchvision models load unchanged. Nothing is downloaded.

``in_channels`` other than 3 replaces the first ``Conv2d`` by one with the requested number of input
channels (freshly initialised, so only for models trained that way). These networks have no
``return_features`` argument; :class:`zoo.Classifier` reads their penultimate features with a hook on
the last Linear layer.
"""

from __future__ import annotations

import difflib

import torchvision
from torch import nn

from ..errors import ZooError

__all__ = ["torchvision_names", "build_torchvision"]


def torchvision_names() -> list[str]:
    """Names of torchvision's image-classification models (``tv:`` names), sorted."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _replace_first_conv(model: nn.Module, in_channels: int, name: str) -> None:
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels != 3 or module.groups != 1:
                break
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            parent_name, _, attr = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            return
    raise ZooError(
        f"tv:{name}: cannot adapt the first convolution to in_channels={in_channels}; "
        "use in_channels=3 (repeat grey images to 3 channels) or a zoo architecture"
    )


def build_torchvision(name: str, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision model ``name`` with random weights, ``num_classes`` outputs, ``in_channels`` inputs."""
    known = torchvision_names()
    if name not in known:
        close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join('tv:' + c for c in close)}?" if close else ""
        raise ZooError(f"unknown torchvision model 'tv:{name}'.{hint} Known: {', '.join(known)}")
    if name.startswith(("inception", "googlenet")) and in_channels != 3:
        raise ZooError(f"tv:{name} transforms its input assuming 3 channels; use in_channels=3")
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except (TypeError, ValueError) as exc:
        raise ZooError(f"tv:{name}: cannot build with num_classes={num_classes}: {exc}") from exc
    if in_channels != 3:
        _replace_first_conv(model, in_channels, name)
    return model

"""A classifier that takes pixels: a network plus the normalisation it was trained with.

:class:`Classifier` is what every stage of the toolkit calls a teacher or a student. Its input is
**pixel space**: float images in [0, 1], NCHW. It applies its own ``(x - mean) / std`` before the
network, so generators end in a sigmoid and never need to know a teacher's normalisation, and images
stored as uint8 PNGs are exactly what the classifier saw.

Penultimate features (the vector fed to the final Linear layer) come from the network's
``forward(x, return_features=True)`` for zoo networks, and from a hook on the last ``nn.Linear`` that
runs for any other ``nn.Module`` (torchvision models). TorchScript networks give logits only.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from .card import DEFAULT_MEAN, DEFAULT_STD, TeacherCard
from .errors import ZooError

__all__ = ["Classifier", "is_torchscript"]

_BN_NAMES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"}


def is_torchscript(network: nn.Module) -> bool:
    """True for a scripted or traced module (whose submodules are not plain ``nn`` layers)."""
    return isinstance(network, torch.jit.ScriptModule)


def _supports_return_features(network: nn.Module) -> bool:
    if is_torchscript(network):
        return False
    try:
        return "return_features" in inspect.signature(network.forward).parameters
    except (TypeError, ValueError):
        return False


def _as_logits(output: object) -> torch.Tensor:
    # torchvision's Inception/GoogLeNet return a named tuple with auxiliary logits in training mode.
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits  # type: ignore[no-any-return]
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ZooError(f"the network returned {type(output).__name__}, not a logits tensor")


def _last_linear(network: nn.Module) -> nn.Linear | None:
    last = None
    for module in network.modules():
        if isinstance(module, nn.Linear):
            last = module
    return last


def _first_conv(network: nn.Module) -> nn.Conv2d | None:
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            return module
    return None


class Classifier(nn.Module):
    """``network`` with its normalisation in front; takes [0, 1] pixels (NCHW) and returns logits.

    Args:
        network: the bare network (zoo, torchvision or TorchScript module).
        mean, std: per-channel normalisation; ``None`` takes them from ``card``, else 0.5 / 0.5.
        card: the :class:`~zoo.TeacherCard`; built from the network when ``None`` (number of classes
            from the last Linear layer, channels from the first convolution, input size 32).

    Attributes:
        network: the wrapped network.
        card: its :class:`~zoo.TeacherCard` (normalisation always equals ``mean``/``std`` here).
        num_classes: number of outputs.
        input_shape: ``(C, H, W)`` the network expects.
        normalization_source: where ``mean``/``std`` came from: ``"given"``, ``"card"`` or ``"default"``.
        mean, std: buffers of shape ``[1, C, 1, 1]``; not part of ``state_dict`` (the card holds them).
    """

    def __init__(
        self,
        network: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        card: TeacherCard | None = None,
    ):
        super().__init__()
        self.network = network
        if card is None:
            card = self._card_from_network(network, mean)
            self.normalization_source = "given" if mean is not None or std is not None else "default"
        else:
            self.normalization_source = "given" if mean is not None or std is not None else "card"
        if mean is not None or std is not None:
            card = card.replace(
                mean=tuple(mean) if mean is not None else card.mean,
                std=tuple(std) if std is not None else card.std,
            )
        # Sanity check for zoo networks, whose last Linear is always the classifier.
        last = _last_linear(network) if _supports_return_features(network) else None
        if last is not None and last.out_features != card.num_classes:
            raise ZooError(
                f"the card says {card.num_classes} classes but the network's last Linear layer has "
                f"{last.out_features} outputs"
            )
        self.card = card
        channels = len(card.mean or ())
        # Not persistent: the card is the record of the normalisation, the state_dict holds weights only.
        self.register_buffer("mean", torch.tensor(card.mean).view(1, channels, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(card.std).view(1, channels, 1, 1), persistent=False)
        self._native_features = _supports_return_features(network)

    @staticmethod
    def _card_from_network(network: nn.Module, mean: Sequence[float] | None) -> TeacherCard:
        last = _last_linear(network)
        if last is None or is_torchscript(network):
            raise ZooError(
                "cannot tell this network's number of classes; pass card=TeacherCard(arch=..., num_classes=...)"
            )
        conv = _first_conv(network)
        in_channels = conv.in_channels if conv is not None else (len(mean) if mean is not None else 3)
        arch = getattr(network, "zoo_arch", None) or type(network).__name__
        input_size = 224 if arch.startswith("tv:") else 32
        return TeacherCard(
            arch=arch,
            num_classes=last.out_features,
            in_channels=in_channels,
            input_size=input_size,
            mean=(DEFAULT_MEAN,) * in_channels,
            std=(DEFAULT_STD,) * in_channels,
        )

    @property
    def num_classes(self) -> int:
        return self.card.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.card.in_channels, self.card.input_size, self.card.input_size)

    @property
    def feature_dim(self) -> int | None:
        """Length of the penultimate feature vector, or ``None`` when it cannot be known (TorchScript)."""
        dim = getattr(self.network, "feature_dim", None)
        if isinstance(dim, int):
            return dim
        last = None if is_torchscript(self.network) else _last_linear(self.network)
        return last.in_features if last is not None else None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` for pixels ``x`` in [0, 1]."""
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for pixel-space images ``x`` (float in [0, 1], NCHW)."""
        return _as_logits(self.network(self.normalize(x)))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)``: features are the penultimate vector ``[N, D]`` fed to the last Linear."""
        xn = self.normalize(x)
        if self._native_features:
            logits, features = self.network(xn, return_features=True)
            return logits, features
        if is_torchscript(self.network):
            raise ZooError("this teacher is TorchScript; methods that need penultimate features cannot use it")
        return self._hooked_forward(xn)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, D]`` for pixel-space images ``x``."""
        return self.forward_with_features(x)[1]

    def _hooked_forward(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        linears = [m for m in self.network.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ZooError(
                f"{type(self.network).__name__} has no nn.Linear layer, so its penultimate features "
                "cannot be located; methods that need them cannot use this network"
            )
        captured: dict[str, torch.Tensor] = {}

        # Hook every Linear and keep the input of the last one to *run*: registration order need not
        # be execution order (e.g. attention MLPs registered after the head).
        def grab(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            captured["x"] = inputs[0]

        handles = [m.register_forward_pre_hook(grab) for m in linears]
        try:
            logits = _as_logits(self.network(xn))
        finally:
            for handle in handles:
                handle.remove()
        if "x" not in captured:
            raise ZooError(f"{type(self.network).__name__} ran no nn.Linear layer; cannot locate its features")
        features = captured["x"]
        if features.dim() != 2:
            features = features.reshape(features.shape[0], -1)
        return logits, features

    def has_batchnorm(self) -> bool:
        """True when the network has at least one BatchNorm layer (needed by BN-statistics losses)."""
        for module in self.network.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                return True
            if getattr(module, "original_name", None) in _BN_NAMES:  # TorchScript submodules
                return True
        return False

    def extra_repr(self) -> str:
        return f"arch={self.card.arch!r}, num_classes={self.num_classes}, input_shape={self.input_shape}"

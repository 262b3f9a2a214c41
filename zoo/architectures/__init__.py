"""Architectures the data-free KD literature uses for CIFAR-sized inputs, by name.

:data:`ARCHITECTURES` maps a name to a constructor ``(num_classes, in_channels) -> nn.Module``. Every
network's parameter names match the public DFKD code it comes from (named in each module's
docstring), so checkpoints trained with those codebases load unchanged, and every network's
``forward(x, return_features=False)`` returns logits or ``(logits, penultimate features)``.

========================  ==========================================================================
name                      definition matched
========================  ==========================================================================
resnet8/20/32/56, x4      RepDistiller ``models/resnet.py`` (:mod:`.resnet_tiny`)
resnet18, resnet34        DAFL ``resnet.py`` = Fast-Datafree / CMI ``classifiers/resnet.py`` (:mod:`.resnet`)
wrn16_1 ... wrn40_2       ZSKT ``models/wresnet.py`` = RepDistiller ``wrn.py`` = Fast-Datafree ``wresnet.py``
vgg8, vgg11, vgg13        RepDistiller ``models/vgg.py`` with BatchNorm (:mod:`.vgg`)
mobilenetv2               RepDistiller ``models/mobilenetv2.py`` ``mobile_half`` (:mod:`.mobilenetv2`)
lenet5                    DAFL ``lenet.py`` ``LeNet5`` (:mod:`.lenet`)
========================  ==========================================================================

Look-ups ignore case, ``-`` and ``_``: ``WRN-16-2``, ``wrn_16_2`` and ``wrn16_2`` are the same entry.
:func:`build_model` also accepts ``tv:NAME`` for torchvision's ImageNet models.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from ..errors import ZooError
from .lenet import lenet5
from .mobilenetv2 import mobilenetv2
from .resnet import resnet18, resnet34
from .resnet_tiny import resnet8, resnet8x4, resnet20, resnet32, resnet32x4, resnet56
from .torchvision_models import build_torchvision, torchvision_names
from .vgg import vgg8, vgg11, vgg13
from .wresnet import wrn16_1, wrn16_2, wrn40_1, wrn40_2

__all__ = ["ARCHITECTURES", "build_model", "canonical_arch", "torchvision_names"]

Constructor = Callable[[int, int], nn.Module]

# Extra spellings used by the public codebases' own registries.
_ALIASES = {
    "wrn161": "wrn16_1",
    "wrn162": "wrn16_2",
    "wrn401": "wrn40_1",
    "wrn402": "wrn40_2",
    "vgg8bn": "vgg8",
    "vgg11bn": "vgg11",
    "vgg13bn": "vgg13",
    "mobilehalf": "mobilenetv2",
    "lenet": "lenet5",
}


def _squash(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "").replace(" ", "")


class _Registry(dict):
    """A dict of canonical names whose look-ups also accept case/hyphen/underscore variants."""

    def _resolve(self, name: object) -> object:
        if isinstance(name, str) and not dict.__contains__(self, name):
            squashed = _squash(name)
            for key in self:
                if _squash(key) == squashed:
                    return key
            return _ALIASES.get(squashed, name)
        return name

    def __getitem__(self, name: object) -> Constructor:
        return dict.__getitem__(self, self._resolve(name))

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, self._resolve(name))

    def get(self, name: object, default: object = None) -> object:
        return dict.get(self, self._resolve(name), default)


_REGISTRY = _Registry(
    resnet8=resnet8,
    resnet20=resnet20,
    resnet32=resnet32,
    resnet56=resnet56,
    resnet8x4=resnet8x4,
    resnet32x4=resnet32x4,
    resnet18=resnet18,
    resnet34=resnet34,
    wrn16_1=wrn16_1,
    wrn16_2=wrn16_2,
    wrn40_1=wrn40_1,
    wrn40_2=wrn40_2,
    vgg8=vgg8,
    vgg11=vgg11,
    vgg13=vgg13,
    mobilenetv2=mobilenetv2,
    lenet5=lenet5,
)
ARCHITECTURES: dict[str, Constructor] = _REGISTRY


def canonical_arch(arch: str) -> str:
    """The registry name for ``arch`` (``"WRN-16-2"`` -> ``"wrn16_2"``); ``tv:`` names pass through.

    Raises :class:`ZooError` with close matches when the name is unknown.
    """
    if arch.strip().lower().startswith("tv:"):
        name = arch.strip()[3:].lower()  # torchvision's model names are all lower case
        if name not in torchvision_names():
            build_torchvision(name)  # raises the ZooError with suggestions
        return "tv:" + name
    resolved = _REGISTRY._resolve(arch)
    if isinstance(resolved, str) and dict.__contains__(_REGISTRY, resolved):
        return resolved
    known = list(ARCHITECTURES)
    by_squash = {_squash(k): k for k in known}
    close = difflib.get_close_matches(_squash(arch), list(by_squash), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(by_squash[c] for c in close)}?" if close else ""
    raise ZooError(
        f"unknown architecture '{arch}'.{hint} Known: {', '.join(known)}; "
        "or 'tv:NAME' for a torchvision ImageNet model (e.g. tv:resnet50)"
    )


def build_model(arch: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A freshly initialised network ``arch`` with ``num_classes`` outputs and ``in_channels`` inputs.

    ``arch`` is a registry name (see :data:`ARCHITECTURES`; case, ``-`` and ``_`` are ignored) or
    ``tv:NAME`` for torchvision's model ``NAME`` without weights. Unknown names raise :class:`ZooError`
    listing the known ones and the closest matches.
    """
    if num_classes < 1 or in_channels < 1:
        raise ZooError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
    name = canonical_arch(arch)
    if name.startswith("tv:"):
        model = build_torchvision(name[3:], num_classes=num_classes, in_channels=in_channels)
    else:
        model = ARCHITECTURES[name](num_classes, in_channels)
    # Lets a Classifier built without a card record which registry entry this is.
    model.zoo_arch = name
    return model

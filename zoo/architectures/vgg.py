"""VGG with BatchNorm for CIFAR-sized inputs, as defined in RepDistiller.

Matches ``models/vgg.py`` of HobbitLong/RepDistiller (re-used by Fast-Datafree and CMI as
``classifiers/vgg.py``) with ``batch_norm=True``, i.e. RepDistiller's ``vgg8_bn``/``vgg11_bn``/``vgg13_bn``,
which their registries call ``vgg8``/``vgg11``/``vgg13``. The convolutions are split into five
Sequentials ``block0`` ... ``block4`` of ``[Conv2d(bias), BatchNorm2d, ReLU, ...]`` whose trailing ReLU is
dropped (the forward pass applies it), followed by one Linear layer named ``classifier``. Parameter
names::

    block0.0.weight, block0.0.bias, block0.1.*, block0.3.weight, ..., block4.N.*,
    classifier.weight, classifier.bias

The forward pass is the public one: max-pooling after blocks 0-2, after block 3 only for 64-pixel inputs
(as in RepDistiller), then a global average pool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VGG", "vgg8", "vgg11", "vgg13", "CONFIGS"]

# Output channels of the convolutions of each of the five blocks.
CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _make_block(widths: Sequence[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    # RepDistiller drops each block's last ReLU so that the block ends in BN (for pre-activation
    # features); the module indices, hence the checkpoint keys, depend on this.
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN with five convolutional blocks and a single Linear classifier on 512 features.

    Args:
        config: output channels of the convolutions of each block (see :data:`CONFIGS`).
        num_classes: size of the output layer.
        in_channels: channels of the input image (the first convolution adapts).
    """

    def __init__(self, config: Sequence[Sequence[int]], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.block0 = _make_block(config[0], in_channels)
        self.block1 = _make_block(config[1], config[0][-1])
        self.block2 = _make_block(config[2], config[1][-1])
        self.block3 = _make_block(config[3], config[2][-1])
        self.block4 = _make_block(config[4], config[3][-1])
        self.classifier = nn.Linear(config[4][-1], num_classes)
        self.feature_dim = config[4][-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits, or ``(logits, features)`` where features are the pooled vector fed to ``classifier``."""
        height = x.shape[-2]
        out = F.max_pool2d(F.relu(self.block0(x)), 2)
        out = F.max_pool2d(F.relu(self.block1(out)), 2)
        out = F.max_pool2d(F.relu(self.block2(out)), 2)
        out = F.relu(self.block3(out))
        if height == 64:
            # RepDistiller pools here only for 64-pixel inputs (Tiny-ImageNet); kept for compatibility.
            out = F.max_pool2d(out, 2)
        out = F.relu(self.block4(out))
        features = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        logits = self.classifier(features)
        return (logits, features) if return_features else logits


def vgg8(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-8 with BN (RepDistiller ``vgg8_bn``, configuration "S")."""
    return VGG(CONFIGS["vgg8"], num_classes, in_channels)


def vgg11(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-11 with BN (RepDistiller ``vgg11_bn``, configuration "A")."""
    return VGG(CONFIGS["vgg11"], num_classes, in_channels)


def vgg13(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-13 with BN (RepDistiller ``vgg13_bn``, configuration "B")."""
    return VGG(CONFIGS["vgg13"], num_classes, in_channels)

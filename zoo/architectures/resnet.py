"""CIFAR-style ResNet-18 and ResNet-34, as defined in DAFL and re-used by Fast-Datafree and CMI.

Matches ``DAFL/resnet.py`` of huawei-noah/Efficient-Computing (Data-Efficient-Model-Compression), copied
as ``datafree/models/classifiers/resnet.py`` into zju-vipa/Fast-Datafree and zju-vipa/CMI (itself after
kuangliu/pytorch-cifar): a 3x3 stride-1 stem without max-pooling, four stages of basic blocks with
64/128/256/512 channels, global average pooling and a Linear layer named ``linear``. Parameter names::

    conv1.weight, bn1.*, layer1.0.conv1.weight, layer1.0.bn1.*, layer1.0.conv2.weight, layer1.0.bn2.*,
    layer2.0.shortcut.0.weight, layer2.0.shortcut.1.*, ..., linear.weight, linear.bias

For ImageNet-style ResNets (7x7 stem, ``fc``) use ``tv:resnet18`` etc.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "resnet18", "resnet34"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm; the shortcut is an empty Sequential or 1x1 conv + BN."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # An empty Sequential is the identity and adds no keys, exactly as in the public definition.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with a CIFAR stem; ``blocks`` gives the number of basic blocks in each of the 4 stages.

    Args:
        blocks: blocks per stage, ``(2, 2, 2, 2)`` for ResNet-18, ``(3, 4, 6, 3)`` for ResNet-34.
        num_classes: size of the output layer.
        in_channels: channels of the input image (the stem convolution adapts).
    """

    def __init__(self, blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.in_planes = 64
        self.layer1 = self._make_layer(64, blocks[0], stride=1)
        self.layer2 = self._make_layer(128, blocks[1], stride=2)
        self.layer3 = self._make_layer(256, blocks[2], stride=2)
        self.layer4 = self._make_layer(512, blocks[3], stride=2)
        self.linear = nn.Linear(512, num_classes)
        self.feature_dim = 512

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(BasicBlock(self.in_planes, planes, stride if i == 0 else 1))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits, or ``(logits, features)`` where features are the pooled vector fed to ``linear``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        features = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        logits = self.linear(features)
        return (logits, features) if return_features else logits


def resnet18(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-18, CIFAR stem (DAFL / Fast-Datafree / CMI ``resnet18``)."""
    return CifarResNet((2, 2, 2, 2), num_classes, in_channels)


def resnet34(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-34, CIFAR stem (DAFL / Fast-Datafree / CMI ``resnet34``)."""
    return CifarResNet((3, 4, 6, 3), num_classes, in_channels)

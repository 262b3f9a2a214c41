"""CIFAR ResNets of He et al. (2016), depth 6n+2, as defined in RepDistiller.

Matches ``models/resnet.py`` of HobbitLong/RepDistiller (CRD, ICLR 2020), which Fast-Datafree and CMI
re-use as ``classifiers/resnet_tiny.py``: a 3x3 stem with 16 filters (32 for the ``x4`` variants), three
stages of basic blocks at 32, 16 and 8 pixels, global average pooling and a Linear classifier.
Parameter names are those of the public checkpoints::

    conv1.weight, bn1.*, layer1.0.conv1.weight, layer1.0.bn1.*, layer1.0.conv2.weight, layer1.0.bn2.*,
    layer2.0.downsample.0.weight, layer2.0.downsample.1.*, ..., fc.weight, fc.bias

Differences that do not change any checkpoint's outputs at 32x32: the fixed ``AvgPool2d(8)`` is an
adaptive average pool (the same at 32x32, and also valid for other sizes), and blocks do not return
pre-activations (RepDistiller's ``is_last``), which only feature-distillation losses use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyResNet", "resnet8", "resnet20", "resnet32", "resnet56", "resnet8x4", "resnet32x4"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 conv + BN) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # RepDistiller only creates ``downsample`` when the shape changes; an absent module keeps the
        # state_dict key set identical to theirs.
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class TinyResNet(nn.Module):
    """CIFAR ResNet with ``(depth - 2) / 6`` basic blocks per stage.

    Args:
        depth: total number of weighted layers, 6n+2 (8, 20, 32, 56, 110, ...).
        widths: channels of the stem and of the three stages, e.g. ``(16, 16, 32, 64)``.
        num_classes: size of the output layer.
        in_channels: channels of the input image (the stem convolution adapts).
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 (8, 20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.in_planes = widths[0]
        self.layer1 = self._make_layer(widths[1], n, stride=1)
        self.layer2 = self._make_layer(widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[3], n, stride=2)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(BasicBlock(self.in_planes, planes, stride if i == 0 else 1))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits, or ``(logits, features)`` where features are the pooled vector fed to ``fc``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        features = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        logits = self.fc(features)
        return (logits, features) if return_features else logits


def resnet8(num_classes: int = 10, in_channels: int = 3) -> TinyResNet:
    """ResNet-8 (RepDistiller ``resnet8``), 16/16/32/64 channels."""
    return TinyResNet(8, (16, 16, 32, 64), num_classes, in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> TinyResNet:
    """ResNet-20 (RepDistiller ``resnet20``), 16/16/32/64 channels."""
    return TinyResNet(20, (16, 16, 32, 64), num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> TinyResNet:
    """ResNet-32 (RepDistiller ``resnet32``), 16/16/32/64 channels."""
    return TinyResNet(32, (16, 16, 32, 64), num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> TinyResNet:
    """ResNet-56 (RepDistiller ``resnet56``), 16/16/32/64 channels."""
    return TinyResNet(56, (16, 16, 32, 64), num_classes, in_channels)


def resnet8x4(num_classes: int = 10, in_channels: int = 3) -> TinyResNet:
    """ResNet-8x4 (RepDistiller ``resnet8x4``), 32/64/128/256 channels."""
    return TinyResNet(8, (32, 64, 128, 256), num_classes, in_channels)


def resnet32x4(num_classes: int = 10, in_channels: int = 3) -> TinyResNet:
    """ResNet-32x4 (RepDistiller ``resnet32x4``), 32/64/128/256 channels."""
    return TinyResNet(32, (32, 64, 128, 256), num_classes, in_channels)

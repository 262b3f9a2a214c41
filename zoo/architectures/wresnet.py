"""Wide Residual Networks WRN-d-k (Zagoruyko & Komodakis, 2016) in the pre-activation CIFAR form.

Matches ``models/wresnet.py`` of polo5/ZeroShotKnowledgeTransfer (ZSKT), ``models/wrn.py`` of
HobbitLong/RepDistiller and ``classifiers/wresnet.py`` of zju-vipa/Fast-Datafree and CMI (all after
xternalz/WideResNet-pytorch). Parameter names::

    conv1.weight,
    block1.layer.0.bn1.*, block1.layer.0.conv1.weight, block1.layer.0.bn2.*, block1.layer.0.conv2.weight,
    block1.layer.0.convShortcut.weight   (only where the width or stride changes),
    ..., block3.layer.N.*, bn1.*, fc.weight, fc.bias

The forward pass reproduces the public one exactly, including its quirk that a block whose shape
changes applies its first BN+ReLU *before* the shortcut convolution, while an equal-shape block adds the
raw input. The fixed ``avg_pool2d(out, 8)`` is an adaptive average pool (identical at 32x32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WideResNet", "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2"]


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus a shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        # The public definition only has convShortcut when the channel count changes (it never pairs a
        # stride with equal widths), so the key set depends on that alone.
        self.convShortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        if self.convShortcut is None:
            return x + out
        return self.convShortcut(pre) + out


class NetworkBlock(nn.Module):
    """One stage: ``n`` basic blocks held in ``self.layer`` (hence the ``blockK.layer.i`` key names)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for CIFAR-sized inputs.

    Args:
        depth: 6n+4 (16, 22, 28, 40, ...).
        widen_factor: channel multiplier k; stage widths are 16k, 32k, 64k.
        num_classes: size of the output layer.
        in_channels: channels of the input image (the stem convolution adapts).
        drop_rate: dropout between the two convolutions of each block (0 in the DFKD checkpoints).
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        # The public initialisation (He normal with fan_out, zero Linear bias), so that students trained
        # from scratch here start like theirs.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits, or ``(logits, features)`` where features are the pooled vector fed to ``fc``."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        features = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        logits = self.fc(features)
        return (logits, features) if return_features else logits


def wrn16_1(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-16-1 (``wrn_16_1``)."""
    return WideResNet(16, 1, num_classes, in_channels)


def wrn16_2(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-16-2 (``wrn_16_2``)."""
    return WideResNet(16, 2, num_classes, in_channels)


def wrn40_1(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-40-1 (``wrn_40_1``)."""
    return WideResNet(40, 1, num_classes, in_channels)


def wrn40_2(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-40-2 (``wrn_40_2``)."""
    return WideResNet(40, 2, num_classes, in_channels)

"""MobileNetV2 for CIFAR-sized inputs, as defined in RepDistiller.

Matches ``models/mobilenetv2.py`` of HobbitLong/RepDistiller (from "Knowledge Distillation via Route
Constrained Optimization"); its registry entry ``MobileNetV2`` is ``mobile_half``: expansion ratio 6 and
width multiplier 0.5, the defaults here. Unlike torchvision's MobileNetV2, every inverted residual has
an expansion convolution (even with ratio 1), activations are plain ReLU, and the last feature layer
keeps 1280 channels. Parameter names::

    conv1.0.weight, conv1.1.*,
    blocks.0.0.conv.0.weight, blocks.0.0.conv.1.*, blocks.0.0.conv.3.weight, blocks.0.0.conv.4.*,
    blocks.0.0.conv.6.weight, blocks.0.0.conv.7.*, ..., blocks.6.0.conv.7.*,
    conv2.0.weight, conv2.1.*, classifier.0.weight, classifier.0.bias

The fixed ``AvgPool2d(input_size // 16, ceil_mode=True)`` is an adaptive average pool (identical at
32x32). Fast-Datafree's and CMI's own ``mobilenetv2`` is torchvision's layout; load those checkpoints
with ``tv:mobilenet_v2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MobileNetV2", "mobilenetv2"]

# (expansion, output channels, repeats, first stride); expansion None means "the network's ratio".
_SETTING: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, 1x1 linear projection; residual when shape is unchanged."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """RepDistiller's CIFAR MobileNetV2.

    Args:
        num_classes: size of the output layer.
        in_channels: channels of the input image (the stem convolution adapts).
        width_mult: channel multiplier (0.5 in the DFKD/KD literature's ``MobileNetV2``).
        expand_ratio: expansion ratio T of the inverted residuals (6).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 0.5,
        expand_ratio: int = 6,
    ):
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTING:
            out_channels = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t or expand_ratio))
                channels = out_channels
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.feature_dim = self.last_channel
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
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
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        out = self.conv2(out)
        features = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        logits = self.classifier(features)
        return (logits, features) if return_features else logits


def mobilenetv2(num_classes: int = 10, in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2, T=6, width 0.5 (RepDistiller ``mobile_half``, registered there as ``MobileNetV2``)."""
    return MobileNetV2(num_classes, in_channels, width_mult=0.5, expand_ratio=6)
